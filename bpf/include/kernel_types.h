/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * kernel_types.h: the few kernel-internal types the tracepoint programs read,
 * declared by hand for CO-RE. Field offsets are relocated at load time against
 * the running kernel's BTF, so the build never depends on the build host's
 * kernel and no generated vmlinux.h is needed.
 */
#ifndef TOOL_KERNEL_TYPES_H
#define TOOL_KERNEL_TYPES_H

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct super_block {
	__u32 s_dev;
};

struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
};

struct file {
	struct inode *f_inode;
};

struct mm_struct {
	unsigned long arg_start;
	unsigned long arg_end;
};

struct task_struct {
	int pid;
	int tgid;
	int exit_code;
	__u64 start_time;
	struct task_struct *real_parent;
	struct task_struct *group_leader;
	struct mm_struct *mm;
};

struct linux_binprm {
	struct file *file;
	const char *filename;
};

#pragma clang attribute pop

#endif /* TOOL_KERNEL_TYPES_H */
