// SPDX-License-Identifier: Apache-2.0
/*
 * The per-node steps of a policy swap, in C: sorting the LPM node keys, finding each node's
 * enclosing node, and writing the difference between two slot contents into the kernel's trie.
 *
 * Python does these for 100k nodes in about 0.4 s on a slow core; here they take a few
 * milliseconds plus the kernel's own time. The library is freestanding (no libc: it issues the
 * bpf(2) syscall itself), so one build runs on any Linux of its architecture. loaders/native.py
 * loads it through cffi in ABI mode and falls back to the Python code when it is absent.
 *
 * Keys are struct tool_lpm_key (bpf/include/tool_abi.h) packed end to end: a u32 prefix length
 * (little-endian, below 256, so its first byte alone orders it), slot, direction, protocol, a pad
 * byte, and a 16-byte address. Compared byte by byte they order like the big-endian integers the
 * Python side uses. Values are struct tool_lpm_value read as one little-endian u64.
 */
#include <stdint.h>
#include <stddef.h>

#define KEY_SIZE 24     /* struct tool_lpm_key */
#define ADDR_OFFSET 8   /* the address within a key */
#define HEAD 8          /* prefix length, slot, direction, protocol, pad */
#define MAX_NODES (1u << 24) /* far above any slot (TOOL_SLOT_NODES), far below overflows */
#define KEY_BITS 32     /* TOOL_LPM_KEY_BITS: the head's share of a prefix length */

#define E_INVAL 22
#define E_NOENT 2

#define BPF_MAP_UPDATE_ELEM 2
#define BPF_MAP_DELETE_ELEM 3

#define EXPORT __attribute__((visibility("default")))

/* The compiler may turn loops into calls to these even when freestanding. */
void *memcpy(void *dst, const void *src, size_t n)
{
	uint8_t *d = dst;
	const uint8_t *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	uint8_t *d = dst;
	while (n--)
		*d++ = (uint8_t)c;
	return dst;
}

static long sys_bpf(long cmd, void *attr, unsigned long size)
{
	long ret;
#if defined(__x86_64__)
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(321L), "D"(cmd), "S"(attr), "d"(size)
			 : "rcx", "r11", "memory");
#elif defined(__aarch64__)
	register long x8 __asm__("x8") = 280;
	register long x0 __asm__("x0") = cmd;
	register long x1 __asm__("x1") = (long)attr;
	register long x2 __asm__("x2") = (long)size;
	__asm__ volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
	ret = x0;
#else
#error "add the bpf(2) syscall for this architecture"
#endif
	return ret;
}

/* union bpf_attr, as BPF_MAP_*_ELEM reads it. */
struct elem_attr {
	uint32_t map_fd;
	uint32_t pad;
	uint64_t key;
	uint64_t value;
	uint64_t flags;
};

static long map_update(int fd, const void *key, const void *value)
{
	struct elem_attr attr = {.map_fd = (uint32_t)fd, .key = (uintptr_t)key, .value = (uintptr_t)value};
	return sys_bpf(BPF_MAP_UPDATE_ELEM, &attr, sizeof(attr));
}

static long map_delete(int fd, const void *key)
{
	struct elem_attr attr = {.map_fd = (uint32_t)fd, .key = (uintptr_t)key};
	return sys_bpf(BPF_MAP_DELETE_ELEM, &attr, sizeof(attr));
}

static uint64_t load_u64(const uint8_t *p)
{
	uint64_t v;
	__builtin_memcpy(&v, p, 8);
	return v;
}

/* The caller says what it packed: only struct tool_lpm_key's size is handled. */
static int key_size_ok(uint32_t size)
{
	return size == KEY_SIZE;
}

/* Keys are compared as big-endian words (KEY_SIZE is three of them). */
static int key_cmp(const uint8_t *a, const uint8_t *b, uint32_t size)
{
	for (uint32_t i = 0; i < size; i += 8) {
		uint64_t x = __builtin_bswap64(load_u64(a + i)), y = __builtin_bswap64(load_u64(b + i));
		if (x != y)
			return x < y ? -1 : 1;
	}
	return 0;
}

/*
 * Sort n keys: `records` and `scratch` each hold n records of (key words, byte-swapped so that
 * they compare as integers; the key's index), words + 1 u64s each. Bottom-up merge sort over
 * the records themselves, so that the passes read memory in order. Leaves the sorted records in
 * `records` or `scratch` and returns which.
 */
static uint64_t *sort_records(const uint8_t *keys, uint32_t n, uint32_t key_size, uint64_t *records,
			      uint64_t *scratch)
{
	uint32_t words = key_size / 8, stride = words + 1;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t *r = records + (size_t)i * stride;
		for (uint32_t w = 0; w < words; w++)
			r[w] = __builtin_bswap64(load_u64(keys + (size_t)i * key_size + w * 8));
		r[words] = i;
	}
	uint64_t *src = records, *dst = scratch;
	for (uint32_t width = 1; width < n; width *= 2) {
		for (uint32_t lo = 0; lo < n; lo += 2 * width) {
			uint32_t mid = lo + width < n ? lo + width : n;
			uint32_t hi = lo + 2 * width < n ? lo + 2 * width : n;
			uint32_t a = lo, b = mid;
			uint64_t *out = dst + (size_t)lo * stride;
			while (a < mid || b < hi) {
				const uint64_t *ra = src + (size_t)a * stride, *rb = src + (size_t)b * stride;
				int take_b = a == mid;
				if (a < mid && b < hi) {
					uint32_t w = 0;
					while (w < words && ra[w] == rb[w])
						w++;
					take_b = w < words && rb[w] < ra[w];
				}
				const uint64_t *from = take_b ? rb : ra;
				for (uint32_t w = 0; w < stride; w++)
					out[w] = from[w];
				out += stride;
				if (take_b)
					b++;
				else
					a++;
			}
		}
		uint64_t *t = src;
		src = dst;
		dst = t;
	}
	return src;
}

/* The index of `probe` in the run [lo, hi) of sorted keys, or -1. */
static int64_t run_find(const uint8_t *sorted, uint32_t key_size, uint32_t lo, uint32_t hi, const uint8_t *probe)
{
	while (lo < hi) {
		uint32_t mid = lo + (hi - lo) / 2;
		int c = key_cmp(sorted + (size_t)mid * key_size, probe, key_size);
		if (c == 0)
			return mid;
		if (c < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

struct run {
	uint32_t start, end; /* node indexes */
	uint32_t length;     /* LPM prefix length of its nodes */
	uint32_t group;      /* slot, direction, protocol */
};

/*
 * For each of the n sorted keys, the prefix length of its nearest enclosing key of the same
 * slot, direction and protocol, or 0 when none encloses it, into parent_len[].
 *
 * Keys come in runs of one prefix length and group; `runs` has room for n of them (the most there
 * can be).
 * `nesting` gets, per node, how many keys enclose it. Returns the index of the first node (in
 * key order) enclosed by `max_nesting` or more keys, or -1 when none is.
 */
static int64_t link_parents(const uint8_t *sorted, uint32_t n, uint32_t key_size, uint16_t *parent_len,
			    uint16_t *nesting, struct run *runs, uint32_t max_nesting)
{
	uint32_t count = 0;
	for (uint32_t i = 0; i < n;) {
		const uint8_t *k = sorted + (size_t)i * key_size;
		uint32_t j = i + 1;
		while (j < n && key_cmp(sorted + (size_t)j * key_size, k, HEAD) == 0)
			j++;
		runs[count].start = i;
		runs[count].end = j;
		runs[count].length = k[0] | (uint32_t)k[1] << 8 | (uint32_t)k[2] << 16 | (uint32_t)k[3] << 24;
		runs[count].group = (uint32_t)k[4] << 16 | (uint32_t)k[5] << 8 | k[6];
		count++;
		i = j;
	}
	int64_t first_too_deep = -1;
	uint8_t probe[KEY_SIZE];
	/* Runs are in ascending length, so an enclosing node is in an earlier run and has its count. */
	for (uint32_t r = 0; r < count; r++) {
		const struct run *run = &runs[r];
		for (uint32_t i = run->start; i < run->end; i++) {
			const uint8_t *k = sorted + (size_t)i * key_size;
			parent_len[i] = 0;
			nesting[i] = 0;
			/* Longest enclosing length first: walk earlier runs of the same group backwards. */
			for (uint32_t s = r; s-- > 0;) {
				const struct run *shorter = &runs[s];
				if (shorter->group != run->group || shorter->length >= run->length)
					continue;
				uint32_t bits = shorter->length - KEY_BITS;
				memcpy(probe, k, key_size);
				probe[0] = (uint8_t)shorter->length;
				probe[1] = (uint8_t)(shorter->length >> 8);
				probe[2] = probe[3] = 0;
				for (uint32_t b = 0; b < 16; b++) {
					uint32_t keep = bits > b * 8 ? bits - b * 8 : 0;
					uint8_t mask = keep >= 8 ? 0xFF : (uint8_t)(0xFF00 >> keep);
					probe[ADDR_OFFSET + b] &= mask;
				}
				int64_t found = run_find(sorted, key_size, shorter->start, shorter->end, probe);
				if (found >= 0) {
					parent_len[i] = (uint16_t)shorter->length;
					nesting[i] = nesting[found] + 1;
					break;
				}
			}
			if (first_too_deep < 0 && nesting[i] >= max_nesting)
				first_too_deep = i;
		}
	}
	return first_too_deep;
}

struct pack_result {
	int64_t too_deep; /* the first node (key order) nested in max_nesting or more others, or -1 */
	uint32_t most;    /* the most rules one node has */
	uint32_t most_at; /* the first node (key order) that has them */
};

/*
 * What a policy's LPM nodes need before they are written, from their n keys and the byte size of
 * each node's packed rules, both in the caller's order: the keys in key order (`sorted`), the
 * caller's index of each (`order`), and each node's struct tool_lpm_value for slot 0 (`values`:
 * index of its first rule, its rule count, the prefix length of its enclosing node).
 * Room the caller provides: `work` 2 * n * (key_size / 8 + 1) u64s, `runs` n runs,
 * `parent_len` and `nesting` n u16s. Returns 0, or -EINVAL for sizes it does not handle.
 */
EXPORT int tool_lpm_pack(const uint8_t *keys, const uint32_t *sizes, uint32_t n, uint32_t key_size,
			 uint32_t rule_size, uint32_t max_nesting, uint8_t *sorted, uint32_t *order,
			 uint8_t *values, uint64_t *work, struct run *runs, uint16_t *parent_len,
			 uint16_t *nesting, struct pack_result *res)
{
	if (!key_size_ok(key_size) || rule_size == 0 || n > MAX_NODES)
		return -E_INVAL;
	uint32_t stride = key_size / 8 + 1;
	const uint64_t *records = sort_records(keys, n, key_size, work, work + (size_t)n * stride);
	for (uint32_t i = 0; i < n; i++) {
		order[i] = (uint32_t)records[(size_t)i * stride + stride - 1];
		memcpy(sorted + (size_t)i * key_size, keys + (size_t)order[i] * key_size, key_size);
	}
	res->too_deep = link_parents(sorted, n, key_size, parent_len, nesting, runs, max_nesting);
	uint64_t first = 0;
	res->most = res->most_at = 0;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t count = sizes[order[i]] / rule_size;
		uint64_t value = first | count << 32 | (uint64_t)parent_len[i] << 48;
		memcpy(values + (size_t)i * 8, &value, 8);
		first += count;
		if (count > res->most) {
			res->most = (uint32_t)count;
			res->most_at = i;
		}
	}
	return 0;
}

/* The merge walks below need both key sets in strictly ascending order. */
static int sorted_unique(const uint8_t *keys, uint32_t n, uint32_t key_size)
{
	for (uint32_t i = 1; i < n; i++)
		if (key_cmp(keys + (size_t)(i - 1) * key_size, keys + (size_t)i * key_size, key_size) >= 0)
			return 0;
	return 1;
}

struct sync_result {
	uint32_t deleted;  /* keys removed */
	uint32_t written;  /* keys added or changed */
	int32_t error;     /* 0, or the negative errno of the failed call */
	uint32_t failed;   /* the failed key: its index in the old (delete) or new (write) keys */
	uint32_t phase;    /* 1: deleting, 2: writing */
};

/*
 * Make one slot of the trie hold `new` where it holds `old`: delete the old keys the new contents
 * lack, then write the new keys that are absent or hold another value. Both sets are sorted and
 * packed for slot 0; the slot byte at `slot_offset` is patched on the way, and `value_add` is
 * added to every new value (the slot's offset into the rules array). Stops at the first failure
 * (an absent key when deleting is not one) and says where in `res`. Returns res->error.
 * With fd < 0 nothing is written: `res` counts what would be (to choose between this and a fresh
 * trie).
 */
EXPORT int32_t tool_lpm_sync(int fd, const uint8_t *old_keys, const uint8_t *old_values, uint32_t n_old,
			     const uint8_t *new_keys, const uint8_t *new_values, uint32_t n_new, uint32_t key_size,
			     uint32_t slot_offset, uint8_t slot, uint64_t value_add, struct sync_result *res)
{
	uint8_t key[KEY_SIZE];
	res->deleted = res->written = res->failed = res->phase = 0;
	res->error = 0;
	if (!key_size_ok(key_size) || slot_offset >= key_size || n_old > MAX_NODES || n_new > MAX_NODES ||
	    !sorted_unique(old_keys, n_old, key_size) || !sorted_unique(new_keys, n_new, key_size))
		return res->error = -E_INVAL;
	uint32_t i = 0, j = 0;
	while (i < n_old) {
		const uint8_t *o = old_keys + (size_t)i * key_size;
		int c = j < n_new ? key_cmp(new_keys + (size_t)j * key_size, o, key_size) : 1;
		if (c < 0) {
			j++;
			continue;
		}
		if (c > 0) {
			memcpy(key, o, key_size);
			key[slot_offset] = slot;
			long err = fd < 0 ? 0 : map_delete(fd, key);
			if (err == 0)
				res->deleted++;
			else if (err != -E_NOENT) {
				res->error = (int32_t)err;
				res->failed = i;
				res->phase = 1;
				return res->error;
			}
		} else {
			j++;
		}
		i++;
	}
	i = 0;
	for (j = 0; j < n_new; j++) {
		const uint8_t *k = new_keys + (size_t)j * key_size;
		uint64_t value = load_u64(new_values + (size_t)j * 8);
		int c = 1;
		while (i < n_old && (c = key_cmp(old_keys + (size_t)i * key_size, k, key_size)) < 0)
			i++;
		if (i < n_old && c == 0 && load_u64(old_values + (size_t)i * 8) == value)
			continue;
		memcpy(key, k, key_size);
		key[slot_offset] = slot;
		value += value_add;
		long err = fd < 0 ? 0 : map_update(fd, key, &value);
		if (err != 0) {
			res->error = (int32_t)err;
			res->failed = j;
			res->phase = 2;
			return res->error;
		}
		res->written++;
	}
	return 0;
}
