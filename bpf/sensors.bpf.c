// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * sensors.bpf.c: the kernel side of tool. Every connection attempt, listener,
 * raw/packet socket and exec/exit is decided here and reported through one
 * ring buffer. Verdicts are derived on every call from the active policy and
 * mode; the flow cache folds repeated events and keeps the rule walk's result
 * for one policy generation (never a verdict: see decide()).
 *
 * Hooks (see docs/architecture.md for why each was chosen):
 *   cgroup/connect4|6      outbound TCP and connected UDP      (can refuse: EPERM)
 *   cgroup/sendmsg4|6      unconnected UDP datagrams           (can refuse: EPERM)
 *   cgroup/bind4|6         a process binds a port (listen)     (can refuse: EPERM)
 *   cgroup/post_bind4|6    records who owns a bound port (for inbound attribution)
 *   cgroup/sock_create     raw inet sockets                    (can refuse: EPERM)
 *   cgroup_skb/ingress     inbound TCP SYN                     (can refuse: drop)
 *   sockops                inbound TCP connection established  (observe)
 *   tp_btf/sched_process_exec|fork|exit   process identity
 *   tp/syscalls/sys_enter_socket          AF_PACKET sockets    (can refuse: SIGKILL)
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#include "kernel_types.h"
#include "tool_abi.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define AF_PACKET 17
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOCK_RAW 3
#define SIGKILL 9
#define MAX_CGROUP_DEPTH 16

/* Load-time knobs, set by user space before load. */
const volatile __u64 scope_cgroup_id = 0; /* tracepoints act only below this cgroup (0: whole host) */
const volatile __u32 scope_cgroup_level = 0;
/* Helpers newer than the agent's 5.8 floor, used only where user space found that this kernel
 * lets every program that reaches them call them (loaders/sensors.py, _fast_path_knobs): */
const volatile __u32 have_task_btf = 0;     /* bpf_get_current_task_btf (5.11): the flow key's process */
const volatile __u32 have_coarse_clock = 0; /* bpf_ktime_get_coarse_ns (5.11): the fold window */

/* BTF anchors: ring-buffer records are written through bpf_ringbuf_reserve()
 * pointers, which leave no type in the object's BTF. These unused read-only
 * globals keep the record layouts there, so tests/test_abi.py can check
 * loaders/abi.py against them. */
const volatile struct tool_conn_event tool_abi_conn_event = {};
const volatile struct tool_exec_event tool_abi_exec_event = {};

/* ---- maps ---- */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TOOL_CFG_MAX);
	__type(key, __u32);
	__type(value, __u32);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TOOL_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} sequence SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, __u32); /* tgid */
	__type(value, struct tool_task_info);
} tasks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct tool_slot_cfg);
} slot_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tool_exe_key);
	__type(value, __u64);
} who_exe SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tool_id_key);
	__type(value, __u64);
} who_uid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tool_id_key);
	__type(value, __u64);
} who_gid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tool_cgroup_key);
	__type(value, __u64);
} who_cgroup SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tool_comm_key);
	__type(value, __u64);
} who_comm SEC(".maps");

/*
 * The LPM nodes, one trie per slot. User space may replace the inactive slot's trie with a fresh
 * one instead of deleting its old nodes one by one (loaders/sensors.py, Sensors._write_rules):
 * every trie it makes has exactly the inner template's type, sizes, flags and max_entries.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 2);
	__type(key, __u32);
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_LPM_TRIE);
		__uint(max_entries, TOOL_SLOT_NODES);
		__uint(key_size, sizeof(struct tool_lpm_key));
		__uint(value_size, sizeof(struct tool_lpm_value));
		__uint(map_flags, BPF_F_NO_PREALLOC);
	});
} rule_nodes SEC(".maps");

/*
 * The inner trie's key and value types, by value, so that the object's BTF describes them
 * (tests/test_abi.py compares loaders/abi.py with it). Typed inner map definitions would do it,
 * but libbpf cannot size a key that the BTF has only as a forward declaration.
 */
const volatile struct tool_lpm_key tool_btf_lpm_key;
const volatile struct tool_lpm_value tool_btf_lpm_value;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1048576); /* two slots of 524288 */
	__type(key, __u32);
	__type(value, struct tool_rule);
} rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tool_flow_key);
	__type(value, struct tool_flow_value);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tool_listener_key);
	__type(value, struct tool_listener);
} listeners SEC(".maps");

/* Inbound decisions taken at SYN time, reported again when the connection is established. */
struct inbound_key {
	__u8 remote[16];
	__u16 remote_port;
	__u16 local_port;
	__u32 _pad0;
};
struct inbound_decision {
	__u32 rule_id;
	__u32 generation;
	__u8 verdict;
	__u8 action;
	__u8 unknown;
	__u8 _pad0;
};
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct inbound_key);
	__type(value, struct inbound_decision);
} inbound_decisions SEC(".maps");

/* ---- small helpers ---- */

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);
	if (c)
		*c += 1;
}

/* Remember how full the ring buffer is (user space reports it as a gauge). */
static __always_inline void ring_fill_sample(void)
{
	__u32 idx = TOOL_CNT_RB_AVAIL;
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);
	if (c)
		*c = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
}

static __always_inline __u32 config_get(__u32 idx)
{
	__u32 *v = bpf_map_lookup_elem(&config, &idx);
	return v ? *v : 0;
}

static __always_inline __u64 next_seq(void)
{
	__u32 zero = 0;
	__u64 *s = bpf_map_lookup_elem(&sequence, &zero);
	if (!s)
		return 0;
	*s += 1;
	return *s;
}

static __always_inline void fill_header(struct tool_event_header *h, __u16 kind, __u16 size, __u64 seq,
					__u64 ts_ns)
{
	h->kind = kind;
	h->size = size;
	h->ts_ns = ts_ns;
	h->seq = seq;
	h->cpu = bpf_get_smp_processor_id();
	h->abi = TOOL_ABI_VERSION;
}

static __always_inline void v4_mapped(__u8 addr[16], __u32 ip4_be)
{
	__builtin_memset(addr, 0, 10);
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(&addr[12], &ip4_be, 4);
}

static __always_inline void v6_copy(__u8 addr[16], const __u32 *ip6)
{
	__u32 w[4];
	w[0] = ip6[0];
	w[1] = ip6[1];
	w[2] = ip6[2];
	w[3] = ip6[3];
	__builtin_memcpy(addr, w, 16);
}

/* Load a u32 context field at a constant offset: the verifier refuses context
 * loads through a pointer the compiler has advanced (as it likes to for arrays). */
#define CTX_U32(ctx, type, field)                                                           \
	({                                                                                  \
		__u32 __v;                                                                  \
		asm volatile("%0 = *(u32 *)(%1 + %2)"                                        \
			     : "=r"(__v)                                                    \
			     : "r"(ctx), "i"(__builtin_offsetof(type, field)));              \
		__v;                                                                        \
	})

static __always_inline int in_scope(void)
{
	if (!scope_cgroup_id)
		return 1;
	return bpf_get_current_ancestor_cgroup_id(scope_cgroup_level) == scope_cgroup_id;
}

/* ---- the subject: who is asking ---- */

struct subject {
	struct tool_task task;
	__u64 exe_ino;
	__u64 instance; /* which process this is, for the flow key: tells a recycled pid apart */
	__u32 exe_dev;
	__u8 has_exe;
	__u8 complete;  /* uid, gid, cgroup_id and comm are filled (always, outside process context) */
	__u8 has_task;  /* the task map was read (always, outside process context) */
	__u8 task_miss; /* ... and did not know the process */
};

/*
 * Fill the subject from the current task (process context): only what every
 * decision needs, the pid and the process instance of the flow key (the
 * leader's start time, read from the task itself). The task map's entry
 * (ppid, executable, exec_id for events) is read by subject_task() and the
 * rest (uid, gid, cgroup, comm) by subject_complete(), when a who-class
 * conditions on it or an event is written: a folded repeat never pays for them.
 * Performance (docs/performance.md): every lookup of a large map costs here
 * (about 300 ns for the task map's, against 100 ns for the task's own field).
 */
static __always_inline void subject_task(struct subject *s);

static __always_inline void subject_current(struct subject *s)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	s->task.pid = (__u32)pid_tgid;
	s->task.tgid = pid_tgid >> 32;
	s->complete = 0;
	s->has_task = 0;
	if (have_task_btf) {
		struct task_struct *t = bpf_get_current_task_btf();
		s->instance = t->group_leader->start_time;
	} else {
		subject_task(s); /* an older kernel: the task map's exec_id (0 if unknown) */
		s->instance = s->task.exec_id;
	}
}

/* The task map's entry of a process-context subject. */
static __always_inline void subject_task(struct subject *s)
{
	if (s->has_task)
		return;
	s->has_task = 1;
	__u32 tgid = s->task.tgid;
	struct tool_task_info *ti = bpf_map_lookup_elem(&tasks, &tgid);
	if (ti) {
		s->task.exec_id = ti->exec_id;
		s->task.ppid = ti->ppid;
		s->exe_ino = ti->exe_ino;
		s->exe_dev = ti->exe_dev;
		s->has_exe = 1;
	} else {
		s->task_miss = 1;
		count(TOOL_CNT_TASK_MISS);
	}
}

/* The rest of a process-context subject (same syscall, same task: same values). */
static __always_inline void subject_complete(struct subject *s)
{
	if (s->complete)
		return;
	__u64 uid_gid = bpf_get_current_uid_gid();
	s->task.uid = (__u32)uid_gid;
	s->task.gid = uid_gid >> 32;
	s->task.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(s->task.comm, sizeof(s->task.comm));
	s->complete = 1;
}

static __always_inline __u64 dim_mask(void *map, void *key, __u64 wildcard)
{
	__u64 *m = bpf_map_lookup_elem(map, key);
	return (m ? *m : 0) | wildcard;
}

/*
 * The who-classes this subject belongs to: for each dimension that some class
 * conditions on, the classes that accept the subject's value or have no
 * condition on that dimension; AND over the dimensions.
 * skb != NULL: softirq context, cgroup ancestors come from the socket.
 */
static __always_inline __u64 who_mask(__u32 slot, struct tool_slot_cfg *cfg, struct subject *s,
				      struct __sk_buff *skb)
{
	__u64 mask = ~0ULL;
	__u32 used = cfg->dims_used;

	if (used & ((1 << TOOL_DIM_UID) | (1 << TOOL_DIM_GID) | (1 << TOOL_DIM_COMM)))
		subject_complete(s);

	if (used & (1 << TOOL_DIM_EXE)) {
		subject_task(s);
		struct tool_exe_key k = { .slot = slot, .dev = s->exe_dev, .ino = s->exe_ino };
		mask &= s->has_exe ? dim_mask(&who_exe, &k, cfg->wildcard[TOOL_DIM_EXE])
				   : cfg->wildcard[TOOL_DIM_EXE];
	}
	if (used & (1 << TOOL_DIM_UID)) {
		struct tool_id_key k = { .slot = slot, .id = s->task.uid };
		mask &= dim_mask(&who_uid, &k, cfg->wildcard[TOOL_DIM_UID]);
	}
	if (used & (1 << TOOL_DIM_GID)) {
		struct tool_id_key k = { .slot = slot, .id = s->task.gid };
		mask &= dim_mask(&who_gid, &k, cfg->wildcard[TOOL_DIM_GID]);
	}
	if (used & (1 << TOOL_DIM_COMM)) {
		struct tool_comm_key k = { .slot = slot };
		__builtin_memcpy(k.comm, s->task.comm, TOOL_COMM_LEN);
		mask &= dim_mask(&who_comm, &k, cfg->wildcard[TOOL_DIM_COMM]);
	}
	if (used & (1 << TOOL_DIM_CGROUP)) {
		__u64 m = cfg->wildcard[TOOL_DIM_CGROUP];
		struct tool_cgroup_key k = { .slot = slot };
		for (int level = 0; level < MAX_CGROUP_DEPTH; level++) {
			__u64 id = skb ? bpf_skb_ancestor_cgroup_id(skb, level)
				       : bpf_get_current_ancestor_cgroup_id(level);
			if (!id)
				break;
			k.cgroup_id = id;
			__u64 *v = bpf_map_lookup_elem(&who_cgroup, &k);
			if (v)
				m |= *v;
		}
		mask &= m;
	}
	return mask;
}

/* ---- the decision ---- */

struct decision {
	__u32 rule_id;
	__u32 generation;
	__u8 action;
	__u8 verdict;
	__u8 mode;
	__u8 unknown;
};

/* The rule walk is a global function (verified once for the whole object rather
 * than once per program), and global functions take only scalars (on every
 * kernel since 5.8), so the query travels in four of them: the selector packs
 * slot, direction, protocol and port, the address is two u64 halves, then the
 * subject's classes. (A per-CPU scratch map carried them before: its lookups
 * cost about 100 ns per decision, see docs/performance.md.) */
#define WALK_SEL(slot, direction, protocol, port)                                               \
	((__u64)(slot) | ((__u64)(direction) << 8) | ((__u64)(protocol) << 16) | ((__u64)(port) << 32))

#define WALK_RESULT(action, id) (((__u64)(action) << 32) | (__u32)(id))

/* The best rule of one node: highest action, then lowest rule id (file order). */
__noinline __u64 tool_node_scan(__u32 first, __u32 count, __u64 who, __u32 port)
{
	__u32 best = TOOL_ACT_NONE, best_id = 0;

	for (__u32 i = 0; i < TOOL_MAX_NODE_RULES; i++) {
		if (i >= count)
			break;
		__u32 idx = first + i;
		struct tool_rule *r = bpf_map_lookup_elem(&rules, &idx);
		if (!r)
			break;
		if (!(r->who & who) || port < r->port_lo || port > r->port_hi)
			continue;
		if (r->action > best || (r->action == best && r->rule_id < best_id)) {
			best = r->action;
			best_id = r->rule_id;
		}
	}
	return WALK_RESULT(best, best_id);
}

/*
 * Walk the LPM nodes that contain the address, from the most specific
 * outwards, keeping the best rule. The walk never stops early on a deny: an
 * enclosing node may hold a deny with a lower rule id, and ties go to the lowest
 * id (docs/policy.md), so every enclosing node must be scanned.
 */
__noinline __u64 tool_rule_walk(__u64 sel, __u64 addr_lo, __u64 addr_hi, __u64 who)
{
	struct tool_lpm_key key = {
		.prefixlen = TOOL_LPM_KEY_BITS + 128,
		.slot = (__u8)sel,
		.direction = (__u8)(sel >> 8),
		.protocol = (__u8)(sel >> 16),
	};
	__u32 port = (__u16)(sel >> 32);
	__builtin_memcpy(key.addr, &addr_lo, 8);
	__builtin_memcpy(key.addr + 8, &addr_hi, 8);
	__u32 best = TOOL_ACT_NONE, best_id = 0;
	__u32 slot = key.slot;
	void *nodes = bpf_map_lookup_elem(&rule_nodes, &slot);

	if (!nodes)
		return WALK_RESULT(best, best_id);
	for (int n = 0; n < TOOL_MAX_NESTING; n++) {
		struct tool_lpm_value *node = bpf_map_lookup_elem(nodes, &key);
		if (!node)
			break;
		__u32 parent = node->parent_len;
		__u64 r = tool_node_scan(node->first, node->count, who, port);
		__u32 a = r >> 32, id = (__u32)r;
		if (a > best || (a == best && a != TOOL_ACT_NONE && id < best_id)) {
			best = a;
			best_id = id;
		}
		if (!parent)
			break;
		key.prefixlen = parent;
	}
	return WALK_RESULT(best, best_id);
}

/* ---- the flow: what a decision is about, its cached walk and its folding ---- */

/* The walk result cached in a flow entry (tool_flow_value.walk). */
#define WALK_CACHE(gen, action, id) (((__u64)(gen) << 32) | ((__u64)(action) << 24) | (__u64)(id))
#define WALK_CACHE_MAX_ID 0xffffff

struct flow {
	struct tool_flow_key key;
	struct tool_flow_value *v; /* the entry in `flows`, NULL if none */
	__u64 walk;                /* this decision's walk result as cached (0: none, not cacheable) */
	__u32 dims;                /* dims_used of the policy that decided */
};

/* decide() options (constants: the function is inlined). */
#define DECIDE_UNCOUNTED 1 /* a second look at a decision already counted (sockops) */
#define DECIDE_NO_CGROUP 2 /* softirq without an skb: the socket's cgroup is unknown */

static __always_inline void flow_init(struct flow *f, struct subject *s, __u8 direction, __u8 protocol,
				      const __u8 addr[16], __u16 port)
{
	f->key.tgid = s->task.tgid;
	f->key.direction = direction;
	f->key.protocol = protocol;
	f->key.port = port;
	__builtin_memcpy(f->key.addr, addr, 16);
	f->key.exec_id = s->instance;
	f->v = NULL;
	f->walk = 0;
}

/*
 * Put the subject's values of the dimensions the policy conditions on into the
 * flow key: the walk result cached in the entry then holds for every decision
 * that finds the entry under the same generation. skb != NULL: softirq, the
 * subject is the listener's and the cgroup is the socket's (as in who_mask).
 */
static __always_inline void flow_subject(struct flow *f, __u32 used, struct subject *s, struct __sk_buff *skb)
{
	if (used & (1 << TOOL_DIM_EXE)) {
		subject_task(s);
		f->key.exe_ino = s->exe_ino;
		f->key.exe_dev = s->exe_dev;
	}
	if (!(used & ((1 << TOOL_DIM_UID) | (1 << TOOL_DIM_GID) | (1 << TOOL_DIM_COMM) | (1 << TOOL_DIM_CGROUP))))
		return;
	subject_complete(s);
	if (used & (1 << TOOL_DIM_UID))
		f->key.uid = s->task.uid;
	if (used & (1 << TOOL_DIM_GID))
		f->key.gid = s->task.gid;
	if (used & (1 << TOOL_DIM_COMM))
		__builtin_memcpy(f->key.comm, s->task.comm, TOOL_COMM_LEN);
	if (used & (1 << TOOL_DIM_CGROUP))
		f->key.cgroup_id = skb ? bpf_skb_cgroup_id(skb) : s->task.cgroup_id;
}

/*
 * Decide a flow: the walk (or its result cached in the flow's entry for this
 * policy generation), then the default for (mode, direction), then the
 * verdict. Looks the flow's entry up (f->v) for flow_fold. The cache holds
 * only the walk's result, never a verdict: mode and defaults are applied here
 * at every decision, and a new generation (every policy apply) misses.
 * Returns 0 (and decides nothing) when opts has DECIDE_NO_CGROUP and the
 * policy conditions on cgroups.
 */
static __always_inline int decide(struct decision *d, struct subject *s, struct flow *f, __u8 direction,
				  struct __sk_buff *skb, int opts)
{
	__u32 mode = config_get(TOOL_CFG_MODE);
	__u32 slot = config_get(TOOL_CFG_ACTIVE_SLOT) & 1;
	__u8 best = TOOL_ACT_NONE;
	__u32 best_id = 0;

	d->mode = mode == TOOL_MODE_PREVENT ? TOOL_MODE_PREVENT : TOOL_MODE_DETECT;
	d->generation = 0;

	struct tool_slot_cfg *cfg = bpf_map_lookup_elem(&slot_cfg, &slot);
	__u32 gen = cfg ? cfg->generation : 0;
	if (gen) {
		f->dims = cfg->dims_used;
		if ((opts & DECIDE_NO_CGROUP) && (f->dims & (1 << TOOL_DIM_CGROUP)))
			return 0;
		flow_subject(f, f->dims, s, skb);
	}
	f->v = bpf_map_lookup_elem(&flows, &f->key);
	if (cfg && gen) {
		__u64 cached = f->v ? *(volatile __u64 *)&f->v->walk : 0;
		if (cached >> 32 == gen) {
			best = (__u8)(cached >> 24);
			best_id = cached & WALK_CACHE_MAX_ID;
			f->walk = cached;
		} else {
			__u64 who = who_mask(slot, cfg, s, skb);
			__u64 addr_lo, addr_hi;
			__builtin_memcpy(&addr_lo, f->key.addr, 8);
			__builtin_memcpy(&addr_hi, f->key.addr + 8, 8);
			__u64 r = tool_rule_walk(WALK_SEL(slot, direction, f->key.protocol, f->key.port), addr_lo,
						 addr_hi, who);
			best = r >> 32;
			best_id = (__u32)r;
			if (best_id <= WALK_CACHE_MAX_ID) {
				f->walk = WALK_CACHE(gen, best, best_id);
				if (f->v)
					*(volatile __u64 *)&f->v->walk = f->walk;
			}
		}
		d->generation = gen;
	}

	d->unknown = best == TOOL_ACT_NONE;
	if (d->unknown && cfg && direction >= 1 && direction <= TOOL_DIR_MAX)
		best = cfg->default_action[d->mode - 1][direction - 1];
	d->action = best;
	d->rule_id = best_id;

	switch (best) {
	case TOOL_ACT_DENY:
		d->verdict = d->mode == TOOL_MODE_PREVENT ? TOOL_VERDICT_BLOCK : TOOL_VERDICT_WOULD_BLOCK;
		break;
	case TOOL_ACT_DENY_AUDIT:
		d->verdict = TOOL_VERDICT_WOULD_BLOCK;
		break;
	case TOOL_ACT_ALERT:
		d->verdict = TOOL_VERDICT_ALERT;
		break;
	default:
		d->verdict = TOOL_VERDICT_ALLOW;
	}

	if (opts & DECIDE_UNCOUNTED)
		return 1;
	if (d->verdict == TOOL_VERDICT_BLOCK)
		count(TOOL_CNT_BLOCKED);
	else if (d->verdict == TOOL_VERDICT_WOULD_BLOCK)
		count(TOOL_CNT_WOULD_BLOCK);
	else
		count(TOOL_CNT_ALLOWED);
	if (d->unknown)
		count(TOOL_CNT_UNKNOWN);
	return 1;
}

/* Create the flow's entry if it has none (keeping a walk result for the next decision). */
static __always_inline void flow_insert(struct flow *f, struct decision *d, __u64 last_emit_ns, __u32 flags)
{
	struct tool_flow_value nv = {
		.last_emit_ns = last_emit_ns,
		.decision = ((__u32)d->verdict << 24) | (d->rule_id & 0xffffff),
		.generation = d->generation,
		.flags = flags,
		.walk = f->walk,
	};
	bpf_map_update_elem(&flows, &f->key, &nv, BPF_ANY);
}

/*
 * Fold repeats (f->v looked up by decide, or by the caller): returns the
 * number of folded decisions to report with a new event, or -1 when this
 * decision is folded into the flow's counter. An event is coming otherwise,
 * so the subject's task map entry is read here; the entry remembers whether
 * the task map knew the process, and a folded decision counts that miss again
 * (as every decision did when each one read the task map).
 *
 * The window is measured on the coarse monotonic clock where the kernel
 * allows it (tick resolution, 4 ms at HZ=250), which reads no clock source:
 * a folded repeat then reads no clock at all. Events keep their boot-time
 * timestamp.
 */
#define FOLD_COARSE 0
#define FOLD_BOOT 1 /* tracepoints may not read the coarse clock: their flows carry a key of their own */
static __always_inline long flow_fold(struct flow *f, struct decision *d, struct subject *s, int clock)
{
	struct tool_flow_value *v = f->v;
	__u64 window = (__u64)config_get(TOOL_CFG_FLOW_INTERVAL_MS) * 1000000ULL;
	__u32 decision = ((__u32)d->verdict << 24) | (d->rule_id & 0xffffff);
	__u64 now = !window ? 0 : clock == FOLD_BOOT || !have_coarse_clock ? bpf_ktime_get_boot_ns()
									    : bpf_ktime_get_coarse_ns();

	if (v && window && now - v->last_emit_ns < window && v->decision == decision &&
	    v->generation == d->generation) {
		__sync_fetch_and_add(&v->repeat, 1);
		count(TOOL_CNT_FOLDED);
		if (v->flags & TOOL_FLOW_F_TASK_MISS)
			count(TOOL_CNT_TASK_MISS);
		return -1;
	}
	subject_task(s);
	__u32 flags = s->task_miss ? TOOL_FLOW_F_TASK_MISS : 0;
	long repeat = 0;
	if (v) {
		repeat = v->repeat;
		v->repeat = 0;
		v->last_emit_ns = now;
		v->decision = decision;
		v->generation = d->generation;
		v->flags = flags;
	} else {
		flow_insert(f, d, now, flags);
	}
	return repeat;
}

static __always_inline void emit_conn(__u16 kind, struct subject *s, struct decision *d, __u32 flags,
				      __u16 family, __u8 protocol, __u8 sock_type, __u8 direction,
				      const __u8 local[16], __u16 lport, const __u8 remote[16], __u16 rport,
				      __u64 netns_cookie, __u64 sock_cookie, __u32 repeat)
{
	subject_task(s);
	subject_complete(s);
	__u64 seq = next_seq();
	struct tool_conn_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(TOOL_CNT_RB_FULL);
		return;
	}
	fill_header(&e->hdr, kind, sizeof(*e), seq, bpf_ktime_get_boot_ns());
	e->hdr.flags = flags | (d->unknown ? TOOL_F_UNKNOWN : 0);
	e->task = s->task;
	e->netns_cookie = netns_cookie;
	e->sock_cookie = sock_cookie;
	e->family = family;
	e->protocol = protocol;
	e->direction = direction;
	e->verdict = d->verdict;
	e->mode = d->mode;
	e->action = d->action;
	e->sock_type = sock_type;
	e->rule_id = d->rule_id;
	e->policy_gen = d->generation;
	__builtin_memcpy(e->local_addr, local, 16);
	__builtin_memcpy(e->remote_addr, remote, 16);
	e->local_port = lport;
	e->remote_port = rport;
	e->repeat = repeat;
	bpf_ringbuf_submit(e, 0);
	count(TOOL_CNT_EVENTS);
	ring_fill_sample();
}

static __always_inline __u8 sock_protocol(__u32 type, __u32 protocol)
{
	if (protocol)
		return protocol;
	return type == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP;
}

/* ---- egress: connect, sendmsg; listen: bind ---- */

static __always_inline int on_sock_addr(struct bpf_sock_addr *ctx, __u16 kind, __u8 direction, int v6)
{
	struct subject s = {};
	struct decision d = {};
	struct flow f = {};
	__u8 remote[16], local[16] = {};
	__u16 port = bpf_ntohs((__u16)ctx->user_port);
	__u8 proto = sock_protocol(ctx->type, ctx->protocol);
	__u32 flags = 0;

	if (v6) {
		__u32 ip6[4] = {
			CTX_U32(ctx, struct bpf_sock_addr, user_ip6[0]), CTX_U32(ctx, struct bpf_sock_addr, user_ip6[1]),
			CTX_U32(ctx, struct bpf_sock_addr, user_ip6[2]), CTX_U32(ctx, struct bpf_sock_addr, user_ip6[3]),
		};
		v6_copy(remote, ip6);
	} else {
		v4_mapped(remote, ctx->user_ip4);
		flags |= TOOL_F_V4;
	}
	if (direction == TOOL_DIR_LISTEN && port == 0)
		return 1; /* an ephemeral bind (a client choosing its source): not a listener */

	subject_current(&s);
	flow_init(&f, &s, direction, proto, remote, port);
	decide(&d, &s, &f, direction, NULL, 0);

	long repeat = flow_fold(&f, &d, &s, FOLD_COARSE);
	if (repeat >= 0) {
		if (direction == TOOL_DIR_LISTEN)
			emit_conn(kind, &s, &d, flags, ctx->user_family, proto, ctx->type, direction, remote, port,
				  local, 0, bpf_get_netns_cookie(ctx), bpf_get_socket_cookie(ctx), repeat);
		else
			emit_conn(kind, &s, &d, flags, ctx->user_family, proto, ctx->type, direction, local, 0,
				  remote, port, bpf_get_netns_cookie(ctx), bpf_get_socket_cookie(ctx), repeat);
	}
	return d.verdict == TOOL_VERDICT_BLOCK ? 0 : 1;
}

SEC("cgroup/connect4")
int tool_connect4(struct bpf_sock_addr *ctx)
{
	return on_sock_addr(ctx, TOOL_EV_CONNECT, TOOL_DIR_EGRESS, 0);
}

SEC("cgroup/connect6")
int tool_connect6(struct bpf_sock_addr *ctx)
{
	return on_sock_addr(ctx, TOOL_EV_CONNECT, TOOL_DIR_EGRESS, 1);
}

SEC("cgroup/sendmsg4")
int tool_sendmsg4(struct bpf_sock_addr *ctx)
{
	return on_sock_addr(ctx, TOOL_EV_SENDMSG, TOOL_DIR_EGRESS, 0);
}

SEC("cgroup/sendmsg6")
int tool_sendmsg6(struct bpf_sock_addr *ctx)
{
	return on_sock_addr(ctx, TOOL_EV_SENDMSG, TOOL_DIR_EGRESS, 1);
}

SEC("cgroup/bind4")
int tool_bind4(struct bpf_sock_addr *ctx)
{
	return on_sock_addr(ctx, TOOL_EV_BIND, TOOL_DIR_LISTEN, 0);
}

SEC("cgroup/bind6")
int tool_bind6(struct bpf_sock_addr *ctx)
{
	return on_sock_addr(ctx, TOOL_EV_BIND, TOOL_DIR_LISTEN, 1);
}

/* After bind: remember who owns the port, for inbound packets that arrive without a task. */
static __always_inline int on_post_bind(struct bpf_sock *sk)
{
	struct subject s = {};
	subject_current(&s);
	subject_task(&s);
	subject_complete(&s);

	struct tool_listener l = { .task = s.task, .exe_ino = s.exe_ino, .exe_dev = s.exe_dev };
	__u8 proto = sock_protocol(sk->type, sk->protocol);
	struct tool_listener_key k = {
		.cookie = bpf_get_socket_cookie(sk),
		.port = (__u16)sk->src_port,
		.protocol = proto,
	};
	bpf_map_update_elem(&listeners, &k, &l, BPF_ANY);
	k.cookie = bpf_get_netns_cookie(sk);
	k.by_port = 1;
	bpf_map_update_elem(&listeners, &k, &l, BPF_ANY);
	return 1;
}

SEC("cgroup/post_bind4")
int tool_post_bind4(struct bpf_sock *sk)
{
	return on_post_bind(sk);
}

SEC("cgroup/post_bind6")
int tool_post_bind6(struct bpf_sock *sk)
{
	return on_post_bind(sk);
}

/* ---- raw sockets ---- */

SEC("cgroup/sock_create")
int tool_sock_create(struct bpf_sock *sk)
{
	if (sk->type != SOCK_RAW)
		return 1;

	struct subject s = {};
	struct decision d = {};
	struct flow f = {};
	__u8 none[16] = {};
	__u16 proto = (__u16)sk->protocol;

	subject_current(&s);
	flow_init(&f, &s, TOOL_DIR_RAW, 0, none, proto);
	decide(&d, &s, &f, TOOL_DIR_RAW, NULL, 0);
	long repeat = flow_fold(&f, &d, &s, FOLD_COARSE);
	if (repeat >= 0)
		emit_conn(TOOL_EV_SOCKET, &s, &d, 0, sk->family, (__u8)proto, SOCK_RAW, TOOL_DIR_RAW, none, 0,
			  none, proto, bpf_get_netns_cookie(sk), bpf_get_socket_cookie(sk), repeat);
	return d.verdict == TOOL_VERDICT_BLOCK ? 0 : 1;
}

/* AF_PACKET sockets bypass every cgroup socket hook: a syscall tracepoint sees
 * them, and in prevent mode a refused one ends the caller with SIGKILL before
 * it returns to user space (no hook can fail the syscall without BPF-LSM). */
struct sys_enter_socket_args {
	__u64 common;
	__s32 syscall_nr;
	__u32 _pad0;
	__u64 family;
	__u64 type;
	__u64 protocol;
};

SEC("tp/syscalls/sys_enter_socket")
int tool_packet_socket(struct sys_enter_socket_args *args)
{
	if (args->family != AF_PACKET || !in_scope())
		return 0;

	struct subject s = {};
	struct decision d = {};
	struct flow f = {};
	__u8 none[16] = {};
	__u16 proto = bpf_ntohs((__u16)args->protocol);
	__u32 flags = TOOL_F_PACKET;

	subject_current(&s);
	flow_init(&f, &s, TOOL_DIR_RAW, 0, none, proto);
	f.key.clock = FOLD_BOOT;
	decide(&d, &s, &f, TOOL_DIR_RAW, NULL, 0);
	if (d.verdict == TOOL_VERDICT_BLOCK) {
		bpf_send_signal(SIGKILL);
		flags |= TOOL_F_KILLED;
	}
	long repeat = flow_fold(&f, &d, &s, FOLD_BOOT);
	if (repeat >= 0)
		emit_conn(TOOL_EV_SOCKET, &s, &d, flags, AF_PACKET, 0, (__u8)(args->type & 0xf), TOOL_DIR_RAW,
			  none, 0, none, proto, 0, 0, repeat);
	return 0;
}

/* ---- inbound ---- */

/* Who owns the socket an inbound packet is for: by socket cookie (0: skip), else by port. */
static __always_inline int listener_subject(struct subject *s, __u64 sock_cookie, __u64 netns_cookie,
					    __u16 port, __u8 proto)
{
	struct tool_listener_key k = { .cookie = sock_cookie, .port = port, .protocol = proto };
	struct tool_listener *l = sock_cookie ? bpf_map_lookup_elem(&listeners, &k) : NULL;
	if (!l) {
		k.cookie = netns_cookie;
		k.by_port = 1;
		l = bpf_map_lookup_elem(&listeners, &k);
	}
	if (!l)
		return 0;
	s->task = l->task;
	s->instance = l->task.exec_id;
	s->exe_ino = l->exe_ino;
	s->exe_dev = l->exe_dev;
	s->has_exe = l->exe_ino != 0;
	return 1;
}

/*
 * Whether an inbound packet may be a TCP SYN without ACK: reads the flags in
 * place (no helper call). 1 when it cannot tell (headers not in the linear
 * data), so the full parse decides.
 */
static __always_inline int may_be_syn(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u32 off = sizeof(struct ipv6hdr);

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ih = data;
		if ((void *)(ih + 1) > end)
			return 1;
		off = ih->ihl * 4;
	}
	__u8 *flags = (__u8 *)data + off + 13; /* byte 13 of the TCP header: CWR ECE URG ACK PSH RST SYN FIN */
	if ((void *)(flags + 1) > end)
		return 1;
	return (*flags & 0x12) == 0x02;
}

/* Copy packet bytes: in place when they are in the linear data (no helper call), else with bpf_skb_load_bytes. */
static __always_inline int skb_copy(struct __sk_buff *skb, __u32 off, void *dst, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off <= 64) {
		__u8 *p = (__u8 *)data + off;
		if ((void *)(p + len) <= end) {
			__builtin_memcpy(dst, p, len);
			return 0;
		}
	}
	return bpf_skb_load_bytes(skb, off, dst, len);
}

SEC("cgroup_skb/ingress")
int tool_ingress(struct __sk_buff *skb)
{
	__u8 remote[16], local[16];
	__u16 rport, lport;
	__u16 family;
	__u32 flags = 0;
	struct tcphdr th;

	/* Only a SYN for a listening socket can be a connection attempt. Most
	 * packets belong to other sockets: leave after one context read. The
	 * socket here is always a full one (packets for a request socket are
	 * filtered against its listener, time-wait sockets are not filtered), and
	 * its state is readable without bpf_sk_fullsock(). The listener also gets
	 * the handshake's last ACK: leave that after reading its flags in place. */
	struct bpf_sock *sk = skb->sk;
	if (sk && sk->state != BPF_TCP_LISTEN)
		return 1;
	if (!may_be_syn(skb))
		return 1;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ih;
		if (skb_copy(skb, 0, &ih, sizeof(ih)))
			return 1;
		if (ih.protocol != IPPROTO_TCP)
			return 1;
		if (skb_copy(skb, ih.ihl * 4, &th, sizeof(th)))
			return 1;
		if (!th.syn || th.ack)
			return 1;
		v4_mapped(remote, ih.saddr);
		v4_mapped(local, ih.daddr);
		family = AF_INET;
		flags |= TOOL_F_V4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ih;
		if (skb_copy(skb, 0, &ih, sizeof(ih)))
			return 1;
		if (ih.nexthdr != IPPROTO_TCP)
			return 1;
		if (skb_copy(skb, sizeof(ih), &th, sizeof(th)))
			return 1;
		if (!th.syn || th.ack)
			return 1;
		__builtin_memcpy(remote, &ih.saddr, 16);
		__builtin_memcpy(local, &ih.daddr, 16);
		family = AF_INET6;
	} else {
		return 1;
	}
	rport = bpf_ntohs(th.source);
	lport = bpf_ntohs(th.dest);

	struct subject s = { .complete = 1, .has_task = 1 }; /* softirq: nothing to read from the current task */
	struct decision d = {};
	struct flow f = {};
	__u64 netns = bpf_get_netns_cookie(skb);
	int owned = listener_subject(&s, bpf_get_socket_cookie(skb), netns, lport, IPPROTO_TCP);
	if (!owned) {
		s.task.uid = bpf_get_socket_uid(skb);
		s.task.cgroup_id = bpf_skb_cgroup_id(skb);
	}
	flags |= TOOL_F_NO_TASK;
	flow_init(&f, &s, TOOL_DIR_INGRESS, IPPROTO_TCP, remote, lport);
	decide(&d, &s, &f, TOOL_DIR_INGRESS, skb, 0);

	/* Allowed attempts are reported once established: sockops decides again,
	 * from the walk cached in the flow's entry. It cannot see the socket's
	 * cgroup nor, without a listener record, its uid, and an allowed
	 * connection must not be reported with another verdict, so the SYN's own
	 * decision is kept for it in inbound_decisions when the policy conditions
	 * on cgroups, the listener is unknown, or the verdict is not allow. */
	if (d.verdict != TOOL_VERDICT_BLOCK &&
	    (d.verdict != TOOL_VERDICT_ALLOW || (f.dims & (1 << TOOL_DIM_CGROUP)) || !owned)) {
		struct inbound_key ik = { .remote_port = rport, .local_port = lport };
		__builtin_memcpy(ik.remote, remote, 16);
		struct inbound_decision id = {
			.rule_id = d.rule_id, .generation = d.generation, .verdict = d.verdict, .action = d.action,
			.unknown = d.unknown,
		};
		bpf_map_update_elem(&inbound_decisions, &ik, &id, BPF_ANY);
	}
	if (d.verdict == TOOL_VERDICT_ALLOW) {
		if (!f.v && f.walk)
			flow_insert(&f, &d, 0, 0); /* keep the walk for sockops and the next SYN */
		return 1;
	}
	long repeat = flow_fold(&f, &d, &s, FOLD_COARSE);
	if (repeat >= 0)
		emit_conn(TOOL_EV_INBOUND, &s, &d, flags, family, IPPROTO_TCP, SOCK_STREAM, TOOL_DIR_INGRESS, local,
			  lport, remote, rport, netns, 0, repeat);
	return d.verdict == TOOL_VERDICT_BLOCK ? 0 : 1;
}

SEC("sockops")
int tool_sockops(struct bpf_sock_ops *ops)
{
	if (ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;

	__u8 remote[16], local[16];
	__u32 flags = TOOL_F_NO_TASK;
	__u16 family = ops->family;
	if (family == AF_INET) {
		v4_mapped(remote, ops->remote_ip4);
		v4_mapped(local, ops->local_ip4);
		flags |= TOOL_F_V4;
	} else if (family == AF_INET6) {
		__u32 r6[4] = {
			CTX_U32(ops, struct bpf_sock_ops, remote_ip6[0]), CTX_U32(ops, struct bpf_sock_ops, remote_ip6[1]),
			CTX_U32(ops, struct bpf_sock_ops, remote_ip6[2]), CTX_U32(ops, struct bpf_sock_ops, remote_ip6[3]),
		};
		__u32 l6[4] = {
			CTX_U32(ops, struct bpf_sock_ops, local_ip6[0]), CTX_U32(ops, struct bpf_sock_ops, local_ip6[1]),
			CTX_U32(ops, struct bpf_sock_ops, local_ip6[2]), CTX_U32(ops, struct bpf_sock_ops, local_ip6[3]),
		};
		v6_copy(remote, r6);
		v6_copy(local, l6);
	} else {
		return 1;
	}
	__u16 lport = (__u16)ops->local_port;
	__u16 rport = (__u16)bpf_ntohl(ops->remote_port); /* be16 in the upper half */

	struct subject s = { .complete = 1, .has_task = 1 }; /* softirq: nothing to read from the current task */
	struct decision d = {};
	struct flow f = {};
	__u64 netns = bpf_get_netns_cookie(ops);
	/* by port: the accepted socket's cookie is not the listener's */
	int owned = listener_subject(&s, 0, netns, lport, IPPROTO_TCP);

	/* The decision again, as tool_ingress took it at SYN time (usually from
	 * the walk it cached); where ingress kept the SYN's own decision (a cgroup
	 * policy, an unknown listener, or not allowed), that one. */
	flow_init(&f, &s, TOOL_DIR_INGRESS, IPPROTO_TCP, remote, lport);
	int decided = owned && decide(&d, &s, &f, TOOL_DIR_INGRESS, NULL, DECIDE_UNCOUNTED | DECIDE_NO_CGROUP);
	if (!decided || d.verdict != TOOL_VERDICT_ALLOW) {
		d.mode = config_get(TOOL_CFG_MODE) == TOOL_MODE_PREVENT ? TOOL_MODE_PREVENT : TOOL_MODE_DETECT;
		struct inbound_key ik = { .remote_port = rport, .local_port = lport };
		__builtin_memcpy(ik.remote, remote, 16);
		struct inbound_decision *id = bpf_map_lookup_elem(&inbound_decisions, &ik);
		if (id) {
			d.rule_id = id->rule_id;
			d.generation = id->generation;
			d.verdict = id->verdict;
			d.action = id->action;
			d.unknown = id->unknown;
			bpf_map_delete_elem(&inbound_decisions, &ik);
		} else {
			/* Allowed at SYN time (nothing kept), or its record was evicted. */
			d.rule_id = 0;
			d.verdict = TOOL_VERDICT_ALLOW;
			d.action = TOOL_ACT_ALLOW;
			d.unknown = 1;
		}
		if (!f.v)
			f.v = bpf_map_lookup_elem(&flows, &f.key);
	}

	long repeat = flow_fold(&f, &d, &s, FOLD_COARSE);
	if (repeat >= 0)
		emit_conn(TOOL_EV_ACCEPT, &s, &d, flags, family, IPPROTO_TCP, SOCK_STREAM, TOOL_DIR_INGRESS, local,
			  lport, remote, rport, netns, bpf_get_socket_cookie(ops), repeat);
	return 1;
}

/* ---- process lifecycle ---- */

static __always_inline void emit_task_event(__u16 kind, struct task_struct *p, struct tool_task_info *ti,
					    struct linux_binprm *bprm, __u32 exit_code)
{
	__u64 seq = next_seq();
	struct tool_exec_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(TOOL_CNT_RB_FULL);
		return;
	}
	__u64 uid_gid = bpf_get_current_uid_gid();
	fill_header(&e->hdr, kind, sizeof(*e), seq, bpf_ktime_get_boot_ns());
	e->hdr.flags = 0;
	e->task.pid = BPF_CORE_READ(p, pid);
	e->task.tgid = BPF_CORE_READ(p, tgid);
	e->task.ppid = ti->ppid;
	e->task.uid = (__u32)uid_gid;
	e->task.gid = uid_gid >> 32;
	e->task._pad0 = 0;
	e->task.exec_id = ti->exec_id;
	e->task.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(e->task.comm, sizeof(e->task.comm));
	e->exe_ino = ti->exe_ino;
	e->exe_dev = ti->exe_dev;
	e->exit_code = exit_code;
	e->_pad0 = 0;
	e->filename_len = 0;
	e->args_len = 0;
	if (bprm) {
		const char *fn = BPF_CORE_READ(bprm, filename);
		long n = bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), fn);
		e->filename_len = n > 0 ? n - 1 : 0;
		if (n >= (long)sizeof(e->filename))
			e->hdr.flags |= TOOL_F_TRUNCATED;

		unsigned long start = BPF_CORE_READ(p, mm, arg_start);
		unsigned long end = BPF_CORE_READ(p, mm, arg_end);
		__u32 len = end > start ? (__u32)(end - start) : 0;
		if (len > TOOL_ARGS_LEN) {
			len = TOOL_ARGS_LEN;
			e->hdr.flags |= TOOL_F_TRUNCATED;
		}
		if (len > 0 && len <= TOOL_ARGS_LEN && bpf_probe_read_user(e->args, len, (void *)start) == 0)
			e->args_len = len;
	} else {
		e->filename[0] = 0;
	}
	bpf_ringbuf_submit(e, 0);
	count(TOOL_CNT_EVENTS);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(tool_exec, struct task_struct *p, int old_pid, struct linux_binprm *bprm)
{
	struct tool_task_info ti = {};
	__u32 tgid = BPF_CORE_READ(p, tgid);

	ti.exec_id = BPF_CORE_READ(p, group_leader, start_time);
	ti.ppid = BPF_CORE_READ(p, real_parent, tgid);
	ti.exe_ino = BPF_CORE_READ(bprm, file, f_inode, i_ino);
	ti.exe_dev = BPF_CORE_READ(bprm, file, f_inode, i_sb, s_dev);
	bpf_map_update_elem(&tasks, &tgid, &ti, BPF_ANY);

	if (in_scope())
		emit_task_event(TOOL_EV_EXEC, p, &ti, bprm, 0);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(tool_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = BPF_CORE_READ(parent, tgid);
	__u32 ctgid = BPF_CORE_READ(child, tgid);
	if (ptgid == ctgid)
		return 0; /* a new thread, not a new process */

	struct tool_task_info *pti = bpf_map_lookup_elem(&tasks, &ptgid);
	struct tool_task_info ti = {};
	if (pti)
		ti = *pti;
	ti.exec_id = BPF_CORE_READ(child, start_time);
	ti.ppid = ptgid;
	bpf_map_update_elem(&tasks, &ctgid, &ti, BPF_ANY);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(tool_exit, struct task_struct *p)
{
	__u32 pid = BPF_CORE_READ(p, pid);
	__u32 tgid = BPF_CORE_READ(p, tgid);
	if (pid != tgid)
		return 0; /* a thread, not the process */

	struct tool_task_info *ti = bpf_map_lookup_elem(&tasks, &tgid);
	struct tool_task_info copy = {};
	if (ti)
		copy = *ti;
	if (in_scope())
		emit_task_event(TOOL_EV_EXIT, p, &copy, NULL, BPF_CORE_READ(p, exit_code));
	bpf_map_delete_elem(&tasks, &tgid);
	return 0;
}

/* ---- benchmark producer (not loaded unless asked: benchmarks/bench_pipeline.py) ----
 * Each getppid() of the process bench_tgid emits bench_burst connection records
 * through the same path as real ones (sequence, counters, ring buffer), so the
 * pipeline can be driven faster than real connections would. Needs bpf_loop (5.17). */
const volatile __u32 bench_tgid = 0;
const volatile __u32 bench_burst = 256;

static long bench_emit(__u32 i, void *unused)
{
	struct subject s = {};
	struct decision d = {
		.verdict = TOOL_VERDICT_ALLOW, .action = TOOL_ACT_ALLOW, .mode = TOOL_MODE_DETECT, .unknown = 1,
	};
	__u8 remote[16], local[16] = {};

	s.complete = 1;
	s.has_task = 1;
	s.task.pid = bench_tgid;
	s.task.tgid = bench_tgid;
	__builtin_memcpy(s.task.comm, "bench", 6);
	v4_mapped(remote, bpf_htonl(0x0a000000 | (i & 0xffff)));
	emit_conn(TOOL_EV_CONNECT, &s, &d, TOOL_F_V4, AF_INET, IPPROTO_TCP, SOCK_STREAM, TOOL_DIR_EGRESS, local, 0,
		  remote, 443, 0, 0, 0);
	return 0;
}

SEC("?tp/syscalls/sys_enter_getppid")
int tool_bench_producer(void *ctx)
{
	if (!bench_tgid || (bpf_get_current_pid_tgid() >> 32) != bench_tgid)
		return 0;
	bpf_loop(bench_burst, bench_emit, NULL, 0);
	return 0;
}
