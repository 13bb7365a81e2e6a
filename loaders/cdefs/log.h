/* log.h: libbpf version, print callback and the libc formatter used to expand its va_list. */
typedef void *va_list;  /* x86_64: va_list is __va_list_tag[1], passed as a pointer */
enum libbpf_print_level { LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG };
typedef int (*libbpf_print_fn_t)(enum libbpf_print_level level, const char *fmt, va_list ap);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
uint32_t libbpf_major_version(void);
uint32_t libbpf_minor_version(void);
const char *libbpf_version_string(void);
int libbpf_num_possible_cpus(void);
int libbpf_probe_bpf_map_type(int map_type, const void *opts);
int libbpf_probe_bpf_prog_type(int prog_type, const void *opts);
int libbpf_probe_bpf_helper(int prog_type, int helper_id, const void *opts);
int vsnprintf(char *str, size_t size, const char *fmt, va_list ap);  /* from libc */
