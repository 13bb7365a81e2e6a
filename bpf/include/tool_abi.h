/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * tool_abi.h: every struct and enum shared between the kernel programs and
 * user space. Fixed-width types, explicit padding, append-only enums.
 * tests/test_abi.py checks the Python layouts against the object's BTF.
 */
#ifndef TOOL_ABI_H
#define TOOL_ABI_H

#define TOOL_ABI_VERSION 1

/* Event kinds (opcodes). Append only; never reuse a number. */
enum tool_event_kind {
	TOOL_EV_CONNECT = 1,  /* connect(): TCP, connected UDP (egress) */
	TOOL_EV_SENDMSG = 2,  /* unconnected UDP sendto/sendmsg/sendmmsg (egress) */
	TOOL_EV_INBOUND = 3,  /* inbound TCP SYN at a listener (ingress) */
	TOOL_EV_ACCEPT = 4,   /* inbound TCP connection established (ingress) */
	TOOL_EV_BIND = 5,     /* explicit bind(): a listener appears (listen) */
	TOOL_EV_SOCKET = 6,   /* raw (inet SOCK_RAW) or packet socket created */
	TOOL_EV_EXEC = 7,     /* a process executed a program */
	TOOL_EV_EXIT = 8,     /* a process (thread group) exited */
};

/* Directions: also the direction byte of a policy key. Append only. */
enum tool_direction {
	TOOL_DIR_EGRESS = 1,
	TOOL_DIR_INGRESS = 2,
	TOOL_DIR_LISTEN = 3,
	TOOL_DIR_RAW = 4,
};
#define TOOL_DIR_MAX 4

/* Verdicts carried by events. Append only. */
enum tool_verdict {
	TOOL_VERDICT_ALLOW = 1,       /* allowed (by a rule or the default) */
	TOOL_VERDICT_BLOCK = 2,       /* refused by the kernel */
	TOOL_VERDICT_WOULD_BLOCK = 3, /* a deny decided it, but detect mode or an audit rule let it pass */
	TOOL_VERDICT_ALERT = 4,       /* allowed and flagged by an alert rule or alert default */
};

/* Rule actions, ordered by precedence: the highest matching one decides. */
enum tool_action {
	TOOL_ACT_NONE = 0,
	TOOL_ACT_ALLOW = 1,
	TOOL_ACT_ALERT = 2,
	TOOL_ACT_DENY_AUDIT = 3, /* a deny rule that stays in audit */
	TOOL_ACT_DENY = 4,
};

/* Modes (config[TOOL_CFG_MODE]). */
enum tool_mode {
	TOOL_MODE_DETECT = 1,
	TOOL_MODE_PREVENT = 2,
};

/* Event flags. */
#define TOOL_F_UNKNOWN    (1u << 0) /* no rule matched: the default decided */
#define TOOL_F_V4         (1u << 1) /* addresses are IPv4 (stored v4-mapped) */
#define TOOL_F_NO_TASK    (1u << 2) /* no process context (softirq): task fields from the listener */
#define TOOL_F_PACKET     (1u << 3) /* TOOL_EV_SOCKET: an AF_PACKET socket */
#define TOOL_F_KILLED     (1u << 4) /* TOOL_EV_SOCKET: the caller was sent SIGKILL */
#define TOOL_F_TRUNCATED  (1u << 5) /* TOOL_EV_EXEC: filename or args were cut */

/* Indices of the config array map (u32 values). */
enum tool_config_index {
	TOOL_CFG_MODE = 0,          /* enum tool_mode */
	TOOL_CFG_ACTIVE_SLOT = 1,   /* 0 or 1: which policy slot programs read */
	TOOL_CFG_FLOW_INTERVAL_MS = 2, /* repeats of one flow within this window fold into counters */
	TOOL_CFG_MAX = 8,
};

/* Indices of the per-CPU counters array map (u64 values). Append only. */
enum tool_counter {
	TOOL_CNT_EVENTS = 0,        /* events written to the ring buffer */
	TOOL_CNT_FOLDED = 1,        /* decisions folded into a flow's counter instead of an event */
	TOOL_CNT_RB_FULL = 2,       /* events lost: ring buffer reservation failed */
	TOOL_CNT_ALLOWED = 3,       /* decisions: allowed (incl. alert) */
	TOOL_CNT_BLOCKED = 4,       /* decisions: refused */
	TOOL_CNT_WOULD_BLOCK = 5,   /* decisions: would have been refused */
	TOOL_CNT_UNKNOWN = 6,       /* decisions taken by the default */
	TOOL_CNT_TASK_MISS = 7,     /* connection from a process the task map did not know */
	TOOL_CNT_RB_AVAIL = 8,      /* gauge, not a counter: bytes waiting in the ring buffer at this CPU's last event */
	TOOL_CNT_MAX = 16,
};

#define TOOL_COMM_LEN 16
#define TOOL_FILENAME_LEN 256
#define TOOL_ARGS_LEN 256

/* Common header of every ring-buffer record (32 bytes). */
struct tool_event_header {
	__u16 kind;    /* enum tool_event_kind */
	__u16 size;    /* size of the whole record */
	__u32 flags;   /* TOOL_F_* */
	__u64 ts_ns;   /* bpf_ktime_get_boot_ns() */
	__u64 seq;     /* per-CPU sequence: a gap means lost records */
	__u32 cpu;
	__u32 abi;     /* TOOL_ABI_VERSION */
};

/* Who did it (56 bytes). */
struct tool_task {
	__u32 pid;     /* thread id */
	__u32 tgid;    /* process id */
	__u32 ppid;    /* parent's tgid, from the task map (0 if unknown) */
	__u32 uid;
	__u32 gid;
	__u32 _pad0;
	__u64 exec_id; /* start time (boot ns) of the process: tells a recycled pid apart */
	__u64 cgroup_id;
	char comm[TOOL_COMM_LEN];
};

/* A connection-level decision (TOOL_EV_CONNECT .. TOOL_EV_SOCKET), 160 bytes. */
struct tool_conn_event {
	struct tool_event_header hdr;
	struct tool_task task;
	__u64 netns_cookie;
	__u64 sock_cookie;
	__u16 family;      /* AF_INET, AF_INET6, AF_PACKET */
	__u8 protocol;     /* IPPROTO_*; for raw sockets the socket's protocol */
	__u8 direction;    /* enum tool_direction */
	__u8 verdict;      /* enum tool_verdict */
	__u8 mode;         /* enum tool_mode at the time of the decision */
	__u8 action;       /* enum tool_action that decided (rule or default) */
	__u8 sock_type;    /* SOCK_STREAM, SOCK_DGRAM, SOCK_RAW */
	__u32 rule_id;     /* deciding rule, 0 = none (the default decided) */
	__u32 policy_gen;  /* generation of the policy that decided */
	__u8 local_addr[16];  /* IPv6, or IPv4 as ::ffff:a.b.c.d */
	__u8 remote_addr[16];
	__u16 local_port;     /* host byte order */
	__u16 remote_port;
	__u32 repeat;         /* decisions of this flow folded since its previous event */
};

/* A program was executed (TOOL_EV_EXEC); also sent for TOOL_EV_EXIT. */
struct tool_exec_event {
	struct tool_event_header hdr;
	struct tool_task task;
	__u64 exe_ino;
	__u32 exe_dev;      /* kernel dev_t: major << 20 | minor */
	__u32 exit_code;    /* TOOL_EV_EXIT: wait status */
	__u16 filename_len;
	__u16 args_len;     /* bytes of args (NUL-separated argv) */
	__u32 _pad0;
	char filename[TOOL_FILENAME_LEN];
	char args[TOOL_ARGS_LEN];
};

/* ---- maps shared with user space ---- */

/* tasks map: tgid -> what exec saw. Seeded from /proc by user space. */
struct tool_task_info {
	__u64 exec_id;
	__u64 exe_ino;
	__u32 exe_dev;
	__u32 ppid;
};

/* Policy slot configuration (array map of 2, one per slot). */
struct tool_slot_cfg {
	__u64 wildcard[5];   /* per subject dimension: who-classes with no condition on it */
	__u32 generation;    /* reported in events */
	__u8 default_action[2][TOOL_DIR_MAX]; /* [mode-1][direction-1], enum tool_action */
	__u32 dims_used;     /* bit per enum tool_subject_dim that some who-class conditions on */
};

/* Subject dimensions, index of tool_slot_cfg.wildcard. */
enum tool_subject_dim {
	TOOL_DIM_EXE = 0,
	TOOL_DIM_UID = 1,
	TOOL_DIM_GID = 2,
	TOOL_DIM_CGROUP = 3,
	TOOL_DIM_COMM = 4,
};

/* Keys of the subject maps: each value is a __u64 mask of who-classes. */
struct tool_exe_key {
	__u32 slot;
	__u32 dev;
	__u64 ino;
};
struct tool_id_key {       /* uid and gid maps */
	__u32 slot;
	__u32 id;
};
struct tool_cgroup_key {
	__u32 slot;
	__u32 _pad0;
	__u64 cgroup_id;       /* matches this cgroup and every cgroup below it */
};
struct tool_comm_key {
	__u32 slot;
	char comm[TOOL_COMM_LEN];
};

/* LPM trie key: prefixlen counts the 32 bits of slot/direction/protocol first. */
struct tool_lpm_key {
	__u32 prefixlen;
	__u8 slot;
	__u8 direction;
	__u8 protocol;       /* IPPROTO_TCP, IPPROTO_UDP; 0 for TOOL_DIR_RAW */
	__u8 _pad0;
	__u8 addr[16];       /* IPv6, or IPv4 as ::ffff:a.b.c.d */
};
#define TOOL_LPM_KEY_BITS 32

/* LPM node: the rules whose address is exactly this prefix. */
struct tool_lpm_value {
	__u32 first;         /* index of the first entry in the rules array */
	__u16 count;         /* entries of this node (<= TOOL_MAX_NODE_RULES) */
	__u16 parent_len;    /* prefixlen (key bits) of the nearest enclosing node, 0 = none */
};
#define TOOL_MAX_NODE_RULES 64
#define TOOL_MAX_NESTING 16
#define TOOL_SLOT_NODES 524288 /* LPM nodes per slot (the trie's max_entries) */

/* One rule of a node (24 bytes). */
struct tool_rule {
	__u64 who;           /* who-classes this rule applies to */
	__u16 port_lo;       /* host order; remote port (egress), local port (ingress, listen) */
	__u16 port_hi;       /* for TOOL_DIR_RAW: the socket protocol range */
	__u8 action;         /* enum tool_action */
	__u8 _pad0[3];
	__u32 rule_id;
	__u32 _pad1;
};

/*
 * Flow cache (LRU): folds repeats of a flow, and caches the rule walk's result
 * for one policy generation. The key holds everything the walk depends on:
 * the flow, the process, and the subject values of the dimensions the active
 * policy conditions on (tool_slot_cfg.dims_used; zero for the others), so a
 * process whose uid, gid, comm, cgroup or executable changes gets its own entry.
 */
struct tool_flow_key {
	__u32 tgid;
	__u8 direction;
	__u8 protocol;
	__u16 port;
	__u8 addr[16];
	__u64 exec_id;       /* process context: the leader's task start_time; inbound: the listener's exec_id */
	__u64 exe_ino;       /* subject values: only of dimensions in dims_used, else 0 */
	__u32 exe_dev;
	__u32 uid;
	__u32 gid;
	__u32 clock;         /* 1: last_emit_ns is on the boot clock (tracepoints), 0: the coarse clock */
	__u64 cgroup_id;     /* process context: the task's cgroup; inbound: the socket's */
	char comm[TOOL_COMM_LEN];
};
struct tool_flow_value {
	__u64 last_emit_ns;  /* at the flow's last event (0: none yet): bpf_ktime_get_coarse_ns(), or
			      * bpf_ktime_get_boot_ns() when the key's clock says so */
	__u32 repeat;
	__u32 decision;      /* verdict << 24 | rule_id & 0xffffff: a change forces an event */
	__u32 generation;
	__u32 flags;         /* TOOL_FLOW_F_* */
	__u64 walk;          /* cached walk: generation << 32 | action << 24 | rule_id (< 2^24); 0 = none.
			      * Mode-independent (the verdict is derived at every decision); written
			      * and read as one 64-bit word, so it is never torn. */
};

#define TOOL_FLOW_F_TASK_MISS (1u << 0) /* the task map did not know the process at the last event */

/* Listener owners, for attributing inbound packets (softirq, no current task). */
struct tool_listener_key {
	__u64 cookie;        /* socket cookie (by_cookie) or netns cookie (by_port) */
	__u16 port;
	__u8 protocol;
	__u8 by_port;
	__u32 _pad0;
};
struct tool_listener {
	struct tool_task task;
	__u64 exe_ino;
	__u32 exe_dev;
	__u32 _pad0;
};

#endif /* TOOL_ABI_H */
