/* Start-up: find the real functions, load the session export named by $VELO_SHIM_CONFIG, build
 * the written-fd table, check in. Runs once per process image (constructor, or the first hook
 * called before it), again in no forked child (the child inherits all of it; only the pid that
 * tells a vfork child from a forked one is refreshed).
 */
#include "veloshim.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

struct velo_real_fns velo_real;
int velo_active;

static pthread_once_t velo_once = PTHREAD_ONCE_INIT;
static const unsigned char *conf_map;
static size_t conf_size;
static const struct velo_conf_hdr *conf;
static size_t root_len;
static pid_t velo_pid;

void *velo_sym(void **slot, const char *name)
{
        void *p = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
        if (p == NULL) {
                p = dlsym(RTLD_NEXT, name); /* idempotent: a race stores the same value */
                __atomic_store_n(slot, p, __ATOMIC_RELEASE);
        }
        return p;
}

static void find_real(void)
{
        /* what a vfork child may call (Python's _posixsubprocess, shells): no dlsym there */
        REAL(openat);
        REAL(close);
        REAL(dup);
        REAL(dup2);
        REAL(dup3);
        REAL(fcntl);
        REAL(close_range);
        REAL(closefrom);
        REAL(execve);
        REAL(execvpe);
        REAL(fexecve);
        REAL(execveat);
}

/* A string at `off` must be NUL-terminated inside the map. */
static int conf_string_ok(uint32_t off)
{
        if (off < sizeof(struct velo_conf_hdr) || off >= conf_size)
                return 0;
        return memchr(conf_map + off, '\0', conf_size - off) != NULL;
}

static int load_conf(const char *path)
{
        int fd = velo_sys_openat(AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
        if (fd < 0)
                return -1;
        struct stat st;
        if (velo_sys_fstat(fd, &st) < 0 || st.st_size < (off_t)sizeof(struct velo_conf_hdr) ||
            st.st_size > (off_t)(256u << 20)) {
                velo_sys_close(fd);
                return -1;
        }
        void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        velo_sys_close(fd);
        if (map == MAP_FAILED)
                return -1;
        conf_map = map;
        conf_size = (size_t)st.st_size;
        const struct velo_conf_hdr *h = map;
        if (memcmp(h->magic, VELO_CONF_MAGIC, 8) != 0 || h->version != VELO_CONF_VERSION ||
            h->header_size < sizeof *h || !conf_string_ok(h->root_off) ||
            !conf_string_ok(h->journal_off) || !conf_string_ok(h->sock_off) ||
            !conf_string_ok(h->locks_off) || !conf_string_ok(h->protect_off) ||
            h->proxies_off % 8 != 0 || h->proxies_off > conf_size ||
            (conf_size - h->proxies_off) / sizeof(struct velo_proxy) < h->n_proxies) {
                munmap(map, conf_size);
                conf_map = NULL;
                return -1;
        }
        conf = h;
        root_len = strlen((const char *)conf_map + h->root_off);
        return 0;
}

static void atfork_child(void)
{
        velo_pid = velo_sys_getpid();
        velo_checkin_reset();
}

static void do_init(void)
{
        int saved = errno;
        find_real();
        const char *path = getenv("VELO_SHIM_CONFIG");
        if (path != NULL && *path != '\0' && load_conf(path) == 0) {
                velo_pid = velo_sys_getpid();
                velo_fdtab_init();
                pthread_atfork(NULL, NULL, atfork_child);
                velo_active = 1;
                velo_fd_scan_inherited();
                velo_checkin();
        }
        errno = saved;
}

void velo_init(void)
{
        pthread_once(&velo_once, do_init);
}

/* A vfork child (or a raw clone) shares or inherits memory without our atfork handler having
 * run: it must not change the table that still belongs to its parent. */
int velo_in_vfork_child(void)
{
        return velo_sys_getpid() != velo_pid;
}

__attribute__((constructor)) static void velo_ctor(void)
{
        velo_init();
}

/* exit(): the kernel will close every fd; say so for the written ones. */
__attribute__((destructor)) static void velo_dtor(void)
{
        if (velo_active && !velo_in_vfork_child())
                velo_fd_close_all_marked(2, 0);
}

const char *velo_conf_root(size_t *len)
{
        *len = root_len;
        return (const char *)conf_map + conf->root_off;
}
const char *velo_conf_journal(void)
{
        return (const char *)conf_map + conf->journal_off;
}
const char *velo_conf_sock(void)
{
        return (const char *)conf_map + conf->sock_off;
}
const char *velo_conf_locks(void)
{
        return (const char *)conf_map + conf->locks_off;
}
const char *velo_conf_protect(void)
{
        return (const char *)conf_map + conf->protect_off;
}
int velo_conf_link_mode(void)
{
        return (conf->flags & VELO_CONF_F_LINK) != 0;
}
const struct velo_proxy *velo_conf_proxies(uint32_t *n)
{
        *n = conf->n_proxies;
        return (const struct velo_proxy *)(const void *)(conf_map + conf->proxies_off);
}
