// Example third-party consumer: print every event the agent publishes (npm "nats", core NATS).
//
// Usage: node consumer.mjs --creds /var/lib/tool/credentials/consumer.json [--subject S] [--count N]
//        NATS_URL=nats://consumer:PASSWORD@127.0.0.1:4222 node consumer.mjs
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { connect } from "nats";

const { values } = parseArgs({
  options: {
    creds: { type: "string" },
    url: { type: "string" },
    subject: { type: "string", default: "tool.events.>" },
    count: { type: "string" },
  },
});

function connectOptions() {
  if (values.creds) {
    const creds = JSON.parse(readFileSync(values.creds, "utf8"));
    return { servers: creds.url, user: creds.user, pass: creds.password };
  }
  const url = values.url ?? process.env.NATS_URL;
  if (!url) {
    console.error("give --creds FILE, --url URL or NATS_URL");
    process.exit(2);
  }
  const parsed = new URL(url);
  return {
    servers: `${parsed.hostname}:${parsed.port || 4222}`,
    user: decodeURIComponent(parsed.username),
    pass: decodeURIComponent(parsed.password),
  };
}

const limit = values.count ? Number.parseInt(values.count, 10) : undefined;
const nc = await connect({ ...connectOptions(), name: "example-node-consumer" });
const sub = nc.subscribe(values.subject, limit ? { max: limit } : {});
await nc.flush(); // the server has the subscription: events from now on are seen
console.error("ready");

const decoder = new TextDecoder();
for await (const msg of sub) {
  const text = decoder.decode(msg.data);
  const event = JSON.parse(text);
  console.log(msg.subject, event.type, event.id, text);
}
await nc.drain();
