/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * probes.bpf.c: one trivial program per program type the agent uses.
 * `tool-pipeline doctor` loads each program on its own to prove the kernel accepts the type.
 * The compiled object is committed as loaders/objects/probes.bpf.o
 * (rebuild with tests/loaders/data/build.sh).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("cgroup/connect4")
int probe_connect4(struct bpf_sock_addr *ctx) { return 1; }

SEC("cgroup/connect6")
int probe_connect6(struct bpf_sock_addr *ctx) { return 1; }

SEC("cgroup/sendmsg4")
int probe_sendmsg4(struct bpf_sock_addr *ctx) { return 1; }

SEC("cgroup/sendmsg6")
int probe_sendmsg6(struct bpf_sock_addr *ctx) { return 1; }

SEC("cgroup/post_bind4")
int probe_post_bind4(struct bpf_sock *ctx) { return 1; }

SEC("cgroup/post_bind6")
int probe_post_bind6(struct bpf_sock *ctx) { return 1; }

SEC("cgroup/sock_create")
int probe_sock_create(struct bpf_sock *ctx) { return 1; }

SEC("cgroup_skb/ingress")
int probe_skb_ingress(struct __sk_buff *skb) { return 1; }

SEC("sockops")
int probe_sockops(struct bpf_sock_ops *ctx) { return 1; }

SEC("tp_btf/sched_process_exec")
int probe_tp_btf_exec(__u64 *ctx) { return 0; }

SEC("tp/syscalls/sys_enter_socket")
int probe_tp_sys_enter_socket(void *ctx) { return 0; }
