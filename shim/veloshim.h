/* veloshim: internal interface shared by the shim's source files.
 *
 * The shim is LD_PRELOADed into every process of a shim-backend session. It never changes what a
 * call does (except refusing writes into the store, and Break-Before-Write in --link mode); it
 * journals the intent of every call that may change the projection, before the call, and its
 * completion after. It never talks to the daemon synchronously: the journal is a file it appends
 * to, and the live check-in is a non-blocking datagram-sized send whose failure is ignored.
 *
 * Rules for every hook (they run in arbitrary programs, threads, signal handlers, vfork children):
 * - no malloc, no stdio, no locks held across calls; only stack buffers and raw syscalls for our
 *   own work, so a hook never recurses into another hook;
 * - errno after a hook is exactly what the real call left;
 * - state shared across threads is a byte table updated with atomics; nothing is written to
 *   shared memory in a vfork child (its memory is the parent's).
 */
#ifndef VELOSHIM_H
#define VELOSHIM_H

#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE /* fortified headers define open() etc. inline: we define them */
#endif
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#ifndef _LARGEFILE64_SOURCE
#define _LARGEFILE64_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include "format.h"

/* The shim's own raw syscalls go to libc's syscall(), never to its hook of that function
 * (sysc.c): every `syscall(...)` below and in the .c files is velo_rawsys. */
long velo_rawsys(long number, ...) __attribute__((visibility("hidden")));
void velo_rawsys_init(void) __attribute__((visibility("hidden")));
#define syscall velo_rawsys

#define VELO_EXPORT __attribute__((visibility("default")))
#define VELO_UNUSED __attribute__((unused))

#ifndef TEMP_FAILURE_RETRY
#define TEMP_FAILURE_RETRY(expr)                                                                   \
        ({                                                                                         \
                long _r;                                                                           \
                do                                                                                 \
                        _r = (long)(expr);                                                         \
                while (_r == -1L && errno == EINTR);                                               \
                _r;                                                                                \
        })
#endif

/* errno is saved on entry to our bookkeeping and restored on the way out */
#define VELO_SAVE_ERRNO int _velo_saved_errno = errno
#define VELO_RESTORE_ERRNO (errno = _velo_saved_errno)

/* A resolved target of a call: its canonical path and, when it exists, its stat. */
struct velo_target {
        char path[PATH_MAX];
        size_t len;
        int inside;    /* the path lies in the projection */
        int protect;   /* the path lies in a protected store directory */
        int exists;    /* st is valid */
        int trunc;     /* path was cut (too long) */
        int unknown;   /* could not be resolved */
        int proxy;     /* --link: st is a shared proxy inode (even when it has no name) */
        int broke;     /* Break-Before-Write: path now names a private copy; act on path */
        struct stat st;
};

/* The path a call must use after a Break-Before-Write: the caller's own handle (a dirfd, an
 * AT_EMPTY_PATH fd, a /proc/self/fd/N magic link) may still hold the shared proxy, while the
 * canonical path names the private copy. Only for a target velo_pre* returned VELO_TRACK for. */
static inline const char *velo_redirect(const struct velo_target *t, int *dirfd, const char *path)
{
        if (!t->broke)
                return path;
        *dirfd = AT_FDCWD;
        return t->path;
}

/* velo_pre* flags */
#define VELO_FOLLOW 0x1u /* follow a final symlink */
#define VELO_WRITE 0x2u  /* changes the target: refused in protected directories */
#define VELO_BBW 0x4u    /* changes the target's inode: Break-Before-Write in --link mode */
#define VELO_EMPTY 0x8u  /* an empty path names the dirfd itself (AT_EMPTY_PATH) */

/* velo_pre* results */
#define VELO_PASS 0  /* not ours: call through, journal nothing */
#define VELO_TRACK 1 /* journaled the intent: journal the completion too */
#define VELO_DENY -1 /* refused: return -1 with errno set */

struct velo_real_fns {
        int (*openat)(int, const char *, int, ...);
        int (*close)(int);
        int (*dup)(int);
        int (*dup2)(int, int);
        int (*dup3)(int, int, int);
        int (*fcntl)(int, int, ...);
        int (*close_range)(unsigned, unsigned, int);
        void (*closefrom)(int);
        FILE *(*fopen)(const char *, const char *);
        FILE *(*fopen64)(const char *, const char *);
        FILE *(*freopen)(const char *, const char *, FILE *);
        FILE *(*freopen64)(const char *, const char *, FILE *);
        int (*fclose)(FILE *);
        int (*truncate)(const char *, off_t);
        int (*ftruncate)(int, off_t);
        int (*mkostemps)(char *, int, int);
        int (*renameat2)(int, const char *, int, const char *, unsigned);
        int (*unlinkat)(int, const char *, int);
        int (*linkat)(int, const char *, int, const char *, int);
        int (*symlinkat)(const char *, int, const char *);
        int (*mkdirat)(int, const char *, mode_t);
        int (*fchmodat)(int, const char *, mode_t, int);
        int (*fchmod)(int, mode_t);
        int (*fchownat)(int, const char *, uid_t, gid_t, int);
        int (*fchown)(int, uid_t, gid_t);
        int (*setxattr)(const char *, const char *, const void *, size_t, int);
        int (*lsetxattr)(const char *, const char *, const void *, size_t, int);
        int (*fsetxattr)(int, const char *, const void *, size_t, int);
        int (*removexattr)(const char *, const char *);
        int (*lremovexattr)(const char *, const char *);
        int (*fremovexattr)(int, const char *);
        int (*utimensat)(int, const char *, const struct timespec *, int);
        int (*futimens)(int, const struct timespec *);
        int (*execve)(const char *, char *const[], char *const[]);
        int (*execvpe)(const char *, char *const[], char *const[]);
        int (*fexecve)(int, char *const[], char *const[]);
        int (*execveat)(int, const char *, char *const[], char *const[], int);
        int (*posix_spawn)(pid_t *, const char *, const void *, const void *, char *const[],
                           char *const[]);
        int (*posix_spawnp)(pid_t *, const char *, const void *, const void *, char *const[],
                            char *const[]);
        int (*posix_spawn_file_actions_addopen)(void *, int, const char *, int, mode_t);
        int (*mknodat)(int, const char *, mode_t, dev_t);
        char *(*mkdtemp)(char *);
};

extern struct velo_real_fns velo_real;

/* The next definition of a function (libc's). The ones a vfork child may need (exec, close,
 * dup, open) are looked up at start-up; the rest on first use, so a process that never changes
 * metadata never pays for their dlsym (start-up cost matters: one check per exec'd program). */
void *velo_sym(void **slot, const char *name);
#define REAL(name) ((__typeof__(velo_real.name))velo_sym((void **)&velo_real.name, #name))
extern int velo_active; /* a valid session export was loaded */

/* init.c */
void velo_init(void);
int velo_in_vfork_child(void);

/* resolve.c */
void velo_resolve(int dirfd, const char *path, unsigned flags, struct velo_target *t);
void velo_resolve_fd(int fd, struct velo_target *t);
int velo_decide(int type, uint32_t arg, unsigned flags, struct velo_target *t1,
                struct velo_target *t2);
int velo_pre1(int type, uint32_t arg, int dirfd, const char *path, unsigned flags,
              struct velo_target *t);
int velo_pre_fd(int type, uint32_t arg, int fd, unsigned flags, struct velo_target *t);
int velo_pre2(int type, uint32_t arg, int dirfd1, const char *p1, unsigned f1, int dirfd2,
              const char *p2, unsigned f2, struct velo_target *t1, struct velo_target *t2);
void velo_post(int type, uint32_t arg, const struct velo_target *t1,
               const struct velo_target *t2, long ret, int err);

/* journal.c */
void velo_journal(int type, int phase, int32_t ret, uint32_t arg, uint64_t dev, uint64_t ino,
                  const char *p1, size_t l1, const char *p2, size_t l2, uint32_t flags);
void velo_journal_target(int type, int phase, int32_t ret, uint32_t arg,
                         const struct velo_target *t1, const struct velo_target *t2);
void velo_checkin(void);
void velo_checkin_live(void);
void velo_checkin_reset(void);

/* fdtab.c */
void velo_fdtab_init(void);
void velo_fd_mark(int fd);
int velo_fd_written(int fd);
int velo_fd_max_marked(void);
void velo_fd_clear(int fd);
void velo_fd_copy(int from, int to);
void velo_fd_journal_close(int fd, uint32_t why);
void velo_fd_scan_inherited(void);
void velo_fd_close_all_marked(uint32_t why, int only_cloexec);
void velo_open_done(int fd, const struct velo_target *t, uint32_t arg);

/* open.c: a stream opened or closed by the real function given (fopen, or glibc's functions
 * that open a program's file with its internal fopen: setmntent/endmntent) */
FILE *velo_fopen(FILE *(*real)(const char *, const char *), const char *path, const char *mode);
int velo_fclose(int (*real)(FILE *), FILE *stream);
long velo_openat2(int dirfd, const char *path, const void *how, size_t size);

/* meta.c */
#define VELO_SYS_FCHMODAT2 452 /* the same number on every architecture */
int velo_fchmodat2(int dirfd, const char *path, mode_t mode, int flags);

/* bbw.c */
int velo_is_proxy(uint64_t dev, uint64_t ino);
int velo_bbw(struct velo_target *t);

/* config accessors (init.c) */
const char *velo_conf_root(size_t *len);
const char *velo_conf_journal(void);
const char *velo_conf_sock(void);
const char *velo_conf_locks(void);
const char *velo_conf_protect(void);
int velo_conf_link_mode(void);
const struct velo_proxy *velo_conf_proxies(uint32_t *n);

/* raw syscalls: our own work never goes through a hook */
static inline int velo_sys_openat(int dirfd, const char *path, int flags, mode_t mode)
{
        return (int)syscall(SYS_openat, dirfd, path, flags, mode);
}
static inline int velo_sys_close(int fd)
{
        return (int)syscall(SYS_close, fd);
}
static inline int velo_sys_fstat(int fd, struct stat *st)
{
        return (int)syscall(SYS_fstat, fd, st);
}
static inline int velo_sys_fstatat(int dirfd, const char *path, struct stat *st, int flags)
{
        return (int)syscall(SYS_newfstatat, dirfd, path, st, flags);
}
/* decimal digits of v at the end of buf[0..size); returns the first digit (no stdio: hooks may
 * run in signal handlers and vfork children) */
static inline char *velo_utoa(unsigned long v, char *buf, size_t size)
{
        char *p = buf + size;
        *--p = '\0';
        do
                *--p = (char)('0' + v % 10);
        while ((v /= 10) != 0 && p > buf);
        return p;
}
static inline ssize_t velo_sys_readlink_fd(int fd, char *buf, size_t size)
{
        char proc[40] = "/proc/self/fd/";
        char num[24];
        const char *d = velo_utoa((unsigned long)(unsigned)fd, num, sizeof num);
        size_t i = 14;
        while (*d && i < sizeof proc - 1)
                proc[i++] = *d++;
        proc[i] = '\0';
        return (ssize_t)syscall(SYS_readlinkat, AT_FDCWD, proc, buf, size);
}
static inline pid_t velo_sys_getpid(void)
{
        return (pid_t)syscall(SYS_getpid);
}

#endif
