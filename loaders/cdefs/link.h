/* link.h: attaching programs and the links that keep them attached. */
struct bpf_link;
struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach_cgroup(const struct bpf_program *prog, int cgroup_fd);
struct bpf_link *bpf_link__open(const char *path);
int bpf_link__fd(const struct bpf_link *link);
const char *bpf_link__pin_path(const struct bpf_link *link);
int bpf_link__pin(struct bpf_link *link, const char *path);
int bpf_link__unpin(struct bpf_link *link);
int bpf_link__detach(struct bpf_link *link);
int bpf_link__destroy(struct bpf_link *link);
