/* syscall(3): glibc's generic entry point, a call through the PLT like any other. Programs use it
 * for calls glibc has no wrapper for (openat2) or had none for when they were written (renameat2
 * before glibc 2.28), and some runtimes for all their file calls (a Rust program's
 * libc::syscall). Past the shim, in --link mode `syscall(SYS_openat2, ...)` for writing, or
 * SYS_truncate, SYS_fchmod on a read-only fd... changed the shared proxy in place; nothing was
 * journaled, and the store was not refused.
 *
 * The calls that change the tree are handed to their hooks (same arguments, same result and
 * errno: each of these glibc wrappers is the bare syscall); every other number goes straight to
 * libc's syscall(). Programs that make the syscall instruction themselves (static, Go, io_uring)
 * are still out of reach: see docs/shim.md.
 *
 * The shim's own raw syscalls are velo_rawsys (veloshim.h renames them): libc's syscall(), looked
 * up first thing at start-up, so no call of ours comes back here.
 */
#include "veloshim.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/xattr.h>
#include <utime.h>

#undef syscall

typedef long (*sys_fn)(long, ...);
static sys_fn libc_syscall;

void velo_rawsys_init(void)
{
        if (__atomic_load_n(&libc_syscall, __ATOMIC_ACQUIRE) == NULL)
                __atomic_store_n(&libc_syscall, (sys_fn)dlsym(RTLD_NEXT, "syscall"),
                                 __ATOMIC_RELEASE);
}

/* Like glibc's syscall(), six arguments are passed on whatever the call takes. */
#define SIX_ARGS(a, last)                                                                          \
        long a[6];                                                                                 \
        do {                                                                                       \
                va_list ap;                                                                        \
                va_start(ap, last);                                                                \
                for (int i_ = 0; i_ < 6; i_++)                                                     \
                        a[i_] = va_arg(ap, long);                                                  \
                va_end(ap);                                                                        \
        } while (0)

static long raw6(long n, const long a[6])
{
        velo_rawsys_init();
        sys_fn f = __atomic_load_n(&libc_syscall, __ATOMIC_ACQUIRE);
        if (f == NULL) {
                errno = ENOSYS;
                return -1;
        }
        return f(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}

long velo_rawsys(long n, ...)
{
        SIX_ARGS(a, n);
        return raw6(n, a);
}

#define P(i) ((const char *)(uintptr_t)a[i])
#define I(i) ((int)a[i])

VELO_EXPORT long syscall(long n, ...)
{
        SIX_ARGS(a, n);
        switch (n) {
#ifdef SYS_open
        case SYS_open:
                return open(P(0), I(1), (mode_t)a[2]);
#endif
#ifdef SYS_creat
        case SYS_creat:
                return creat(P(0), (mode_t)a[1]);
#endif
        case SYS_openat:
                return openat(I(0), P(1), I(2), (mode_t)a[3]);
#ifdef SYS_openat2
        case SYS_openat2:
                return velo_openat2(I(0), P(1), (const void *)(uintptr_t)a[2], (size_t)a[3]);
#endif
        case SYS_truncate:
                return truncate(P(0), (off_t)a[1]);
        case SYS_ftruncate:
                return ftruncate(I(0), (off_t)a[1]);
#ifdef SYS_rename
        case SYS_rename:
                return rename(P(0), P(1));
#endif
        case SYS_renameat:
                return renameat(I(0), P(1), I(2), P(3));
        case SYS_renameat2:
                return renameat2(I(0), P(1), I(2), P(3), (unsigned)a[4]);
#ifdef SYS_unlink
        case SYS_unlink:
                return unlink(P(0));
#endif
        case SYS_unlinkat:
                return unlinkat(I(0), P(1), I(2));
#ifdef SYS_rmdir
        case SYS_rmdir:
                return rmdir(P(0));
#endif
#ifdef SYS_link
        case SYS_link:
                return link(P(0), P(1));
#endif
        case SYS_linkat:
                return linkat(I(0), P(1), I(2), P(3), I(4));
#ifdef SYS_symlink
        case SYS_symlink:
                return symlink(P(0), P(1));
#endif
        case SYS_symlinkat:
                return symlinkat(P(0), I(1), P(2));
#ifdef SYS_mkdir
        case SYS_mkdir:
                return mkdir(P(0), (mode_t)a[1]);
#endif
        case SYS_mkdirat:
                return mkdirat(I(0), P(1), (mode_t)a[2]);
#ifdef SYS_mknod
        case SYS_mknod:
                return mknod(P(0), (mode_t)a[1], (dev_t)a[2]);
#endif
        case SYS_mknodat:
                return mknodat(I(0), P(1), (mode_t)a[2], (dev_t)a[3]);
#ifdef SYS_chmod
        case SYS_chmod:
                return chmod(P(0), (mode_t)a[1]);
#endif
        case SYS_fchmod:
                return fchmod(I(0), (mode_t)a[1]);
        case SYS_fchmodat: /* the syscall has no flags: glibc's fchmodat with 0 is this call */
                return fchmodat(I(0), P(1), (mode_t)a[2], 0);
        case VELO_SYS_FCHMODAT2:
                return velo_fchmodat2(I(0), P(1), (mode_t)a[2], I(3));
#ifdef SYS_chown
        case SYS_chown:
                return chown(P(0), (uid_t)a[1], (gid_t)a[2]);
#endif
#ifdef SYS_lchown
        case SYS_lchown:
                return lchown(P(0), (uid_t)a[1], (gid_t)a[2]);
#endif
        case SYS_fchown:
                return fchown(I(0), (uid_t)a[1], (gid_t)a[2]);
        case SYS_fchownat:
                return fchownat(I(0), P(1), (uid_t)a[2], (gid_t)a[3], I(4));
        case SYS_setxattr:
                return setxattr(P(0), P(1), P(2), (size_t)a[3], I(4));
        case SYS_lsetxattr:
                return lsetxattr(P(0), P(1), P(2), (size_t)a[3], I(4));
        case SYS_fsetxattr:
                return fsetxattr(I(0), P(1), P(2), (size_t)a[3], I(4));
        case SYS_removexattr:
                return removexattr(P(0), P(1));
        case SYS_lremovexattr:
                return lremovexattr(P(0), P(1));
        case SYS_fremovexattr:
                return fremovexattr(I(0), P(1));
        case SYS_utimensat:
                if (a[1] == 0) /* (fd, NULL): the fd itself, futimens */
                        return futimens(I(0), (const struct timespec *)(uintptr_t)a[2]);
                return utimensat(I(0), P(1), (const struct timespec *)(uintptr_t)a[2], I(3));
#ifdef SYS_utimes
        case SYS_utimes:
                return utimes(P(0), (const struct timeval *)(uintptr_t)a[1]);
#endif
#ifdef SYS_futimesat
        case SYS_futimesat:
                if (a[1] == 0)
                        return futimes(I(0), (const struct timeval *)(uintptr_t)a[2]);
                return futimesat(I(0), P(1), (const struct timeval *)(uintptr_t)a[2]);
#endif
#ifdef SYS_utime
        case SYS_utime:
                return utime(P(0), (const struct utimbuf *)(uintptr_t)a[1]);
#endif
        default:
                return raw6(n, a);
        }
}
