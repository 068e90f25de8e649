/* Start-up: find the real functions, load the session export named by $VELO_SHIM_CONFIG, build
 * the written-fd table, check in. Runs once per process image (constructor, or the first hook
 * called before it), again in no forked child (the child inherits all of it; only the pid that
 * tells a vfork child from a forked one is refreshed, by the atfork handler or on the first call
 * of a child made without it).
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
        velo_rawsys_init(); /* first: every raw syscall of ours goes through it */
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

/* Tells a child that has its own copy of our memory (fork, _Fork, a raw clone without CLONE_VM:
 * the last two run no atfork handler) from one that shares it (vfork, posix_spawn's CLONE_VM
 * child): this page is MADV_WIPEONFORK, so it reads zero in the first kind only. */
static volatile unsigned char *own_mm;

static void own_mm_init(void)
{
        void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
                return;
        if (madvise(p, 4096, MADV_WIPEONFORK) != 0) { /* kernel < 4.14: pid alone, as before */
                munmap(p, 4096);
                return;
        }
        own_mm = p;
        own_mm[0] = 1;
}

static void atfork_child(void)
{
        velo_pid = velo_sys_getpid();
        velo_checkin_reset();
        if (own_mm != NULL)
                own_mm[0] = 1; /* a vfork child of ours must find it set */
}

static void do_init(void)
{
        int saved = errno;
        find_real();
        const char *path = getenv("VELO_SHIM_CONFIG");
        if (path != NULL && *path != '\0' && load_conf(path) == 0) {
                own_mm_init();
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

/* A vfork child shares its parent's memory: it must not change the table that still belongs to
 * the parent. A child with its own copy made without our atfork handler (a raw clone, _Fork) is
 * a forked child: it takes the table over on its first call, as atfork_child would have (before,
 * it was taken for a vfork child for its whole life: its closes never journaled, its fds never
 * marked, no live check-in). */
int velo_in_vfork_child(void)
{
        pid_t now = velo_sys_getpid();
        if (now == __atomic_load_n(&velo_pid, __ATOMIC_RELAXED))
                return 0;
        if (own_mm == NULL || own_mm[0] != 0)
                return 1; /* shared memory, or cannot tell */
        atfork_child();
        return 0;
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
