/* object.h: opening, loading and closing a BPF object file, and its BTF. */
struct bpf_object;
struct bpf_object_open_opts;
struct btf;
struct btf_type {
	uint32_t name_off;
	uint32_t info;
	uint32_t size_or_type;
};
struct btf_var_secinfo {
	uint32_t type;
	uint32_t offset;
	uint32_t size;
};
struct bpf_object *bpf_object__open_file(const char *path, const struct bpf_object_open_opts *opts);
struct bpf_object *bpf_object__open_mem(const void *obj_buf, size_t obj_buf_sz,
					const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
const char *bpf_object__name(const struct bpf_object *obj);
struct btf *bpf_object__btf(const struct bpf_object *obj);
int32_t btf__find_by_name_kind(const struct btf *btf, const char *type_name, uint32_t kind);
const struct btf_type *btf__type_by_id(const struct btf *btf, uint32_t id);
const char *btf__name_by_offset(const struct btf *btf, uint32_t offset);
