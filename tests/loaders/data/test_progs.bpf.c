/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * test_progs.bpf.c: small programs that exercise the loaders binding in tests.
 * Rebuild the committed object with tests/loaders/data/build.sh.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

char LICENSE[] SEC("license") = "GPL";

/* Load-time knobs (set from Python with BpfObject.set_rodata). */
const volatile __u16 deny_port = 0;  /* host byte order; 0 denies nothing */
const volatile __u32 event_magic = 0;
const volatile __u32 target_tgid = 0;

/* One record per connect4 call. */
struct test_event {
	__u32 magic;
	__u16 port;      /* host byte order */
	__u16 verdict;   /* 1 allowed, 0 denied */
	__u64 cgroup_id;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 64);
} kv SEC(".maps");

struct lpm_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct lpm_v4_key);
	__type(value, __u32);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} calls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} raw_hits SEC(".maps");

SEC("cgroup/connect4")
int connect4_prog(struct bpf_sock_addr *ctx)
{
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u16 allowed = port != deny_port;
	__u32 zero = 0;
	__u64 *count = bpf_map_lookup_elem(&calls, &zero);
	struct test_event *ev;

	if (count)
		*count += 1;
	ev = bpf_ringbuf_reserve(&events, sizeof(*ev), 0);
	if (ev) {
		ev->magic = event_magic;
		ev->port = port;
		ev->verdict = allowed;
		ev->cgroup_id = bpf_get_current_cgroup_id();
		bpf_ringbuf_submit(ev, 0);
	}
	return allowed;
}

/* Counts the target process's syscalls: exercises Program.attach() by section. */
SEC("raw_tp/sys_enter")
int raw_sys_enter(void *ctx)
{
	__u32 zero = 0;
	__u64 *hits;

	if ((__u32)(bpf_get_current_pid_tgid() >> 32) != target_tgid)
		return 0;
	hits = bpf_map_lookup_elem(&raw_hits, &zero);
	if (hits)
		__sync_fetch_and_add(hits, 1);
	return 0;
}

/* Rejected by the verifier (map value used without a NULL check); not loaded unless asked. */
SEC("?cgroup/connect4")
int bad_prog(struct bpf_sock_addr *ctx)
{
	__u32 key = 1;
	__u64 *value = bpf_map_lookup_elem(&kv, &key);

	return *value == 7;
}
