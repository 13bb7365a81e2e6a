"""``tool-pipeline``: the command line (run, doctor, events, policy, status, stats, schema)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import structlog

from loaders import errors as bpf_errors


def setup_logging(verbose: bool = False, *, json_logs: bool | None = None) -> None:
    """structlog to stderr: key=value on a terminal, JSON lines otherwise; libbpf debug only with -v."""
    level = logging.DEBUG if verbose else logging.INFO
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="attach the sensors and run the pipeline (detect mode by default)",
        description="Attach the kernel sensors, run the stage graph and publish every event on NATS. "
        "Settings: built-in defaults < --config file < TOOL_* environment < flags.",
    )
    p.add_argument("--mode", choices=["detect", "prevent"], help="detect: flag only; prevent: the kernel refuses")
    p.add_argument("--nats", metavar="URL", help="use this NATS server or cluster instead of the embedded one")
    p.add_argument(
        "--policy",
        metavar="PATH",
        action="append",
        help="policy file or directory (repeatable; default: the shipped default policy)",
    )
    p.add_argument("--cgroup", metavar="PATH", help="cgroup v2 directory to watch (default: the root: whole host)")
    p.add_argument("--state-dir", metavar="PATH", help="state directory (default: /var/lib/tool)")
    p.add_argument("--audit-log", metavar="PATH", help="audit log file (default: /var/log/tool/audit.log; '' = off)")
    p.add_argument("--config", metavar="PATH", help="YAML config file (default: $TOOL_CONFIG or /etc/tool/config.yaml)")
    p.add_argument("--nats-port", type=int, metavar="PORT", help="embedded NATS port on loopback (default 4222)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (includes libbpf's log)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.agent import Agent
    from pipeline.config import ConfigError, load_config

    setup_logging(args.verbose)
    log = structlog.get_logger("tool")
    try:
        config = load_config(
            args.config,
            overrides={
                "mode": args.mode,
                "nats": args.nats,
                "policy": args.policy,
                "cgroup": args.cgroup,
                "state_dir": args.state_dir,
                "audit_log": args.audit_log,
                "nats_port": args.nats_port,
            },
        )
    except ConfigError as exc:
        print(f"tool-pipeline: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        anyio.run(Agent(config).run)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _start_error(exc)
        if message is None:
            raise
        print(f"tool-pipeline: {message}", file=sys.stderr)
        return 1
    log.info("agent_stopped")
    return 0


def _start_error(exc: BaseException) -> str | None:
    """What to tell the user about an error that stopped the agent, or None for a bug (traceback).

    Errors raised in the agent's task groups arrive wrapped in exception groups; the first
    one that is not a consequence of another is the one to report.
    """
    from pipeline.agent import AgentStartError
    from pipeline.outputs.audit_process import AuditProcessError
    from pipeline.policy import PolicyError

    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, PolicyError):
        return f"the policy has errors, nothing was attached:\n{exc}"
    if isinstance(exc, AgentStartError | AuditProcessError):
        return str(exc)
    if isinstance(exc, bpf_errors.BpfError):
        return f"cannot attach the sensors: {exc}\nrun 'tool-pipeline doctor' for a full check"
    return None


def _add_api(sub: Any) -> None:
    for name, help_text in (
        ("status", "show the running agent's status"),
        ("stats", "show the running agent's counters"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--nats", metavar="URL", help="server URL with credentials (default: embedded, consumer)")
        p.add_argument("--state-dir", type=Path, default=Path("/var/lib/tool"))
        p.set_defaults(func=_api_command, endpoint=name)


def _api_command(args: argparse.Namespace) -> int:
    import nats

    from pipeline.bus.api import api_request
    from pipeline.bus.credentials import CredentialsError, load_credentials

    try:
        url = args.nats or load_credentials(args.state_dir, "consumer").url_with_auth()
    except CredentialsError as exc:
        print(f"tool-pipeline: {exc}", file=sys.stderr)
        return 1

    async def call() -> dict[str, Any]:
        nc = await nats.connect(url, connect_timeout=3, max_reconnect_attempts=0)
        try:
            return await api_request(nc, args.endpoint)
        finally:
            await nc.close()

    try:
        reply = anyio.run(call)
    except Exception as exc:
        print(
            f"tool-pipeline: the agent did not answer ({exc}); is 'tool-pipeline run' running?",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(reply, indent=2))
    return 0


def _add_schema(sub: Any) -> None:
    p = sub.add_parser("schema", help="print the JSON Schema of the published events")
    p.add_argument("what", choices=["events"], nargs="?", default="events")
    p.set_defaults(func=_schema)


def _schema(args: argparse.Namespace) -> int:
    from pipeline.bus.schema import render_events_schema

    sys.stdout.write(render_events_schema())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser."""
    from loaders import doctor
    from pipeline.bus import cli as bus_cli
    from pipeline.policy import cli as policy_cli

    parser = argparse.ArgumentParser(
        prog="tool-pipeline",
        description="See every network connection on this host through eBPF; refuse the undeclared ones.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    doctor.register(sub)
    bus_cli.register(sub)
    policy_cli.register(sub)
    _add_api(sub)
    _add_schema(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tool-pipeline`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command != "run":
        setup_logging(False)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # The reader went away (`tool-pipeline policy diff ... | head`): as other commands do,
        # stop quietly; stdout goes to /dev/null so that the interpreter's final flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command its pipe stopped


if __name__ == "__main__":
    raise SystemExit(main())
