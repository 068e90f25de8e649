/* fd lifetime: close, dup/dup2/dup3, fcntl(F_DUPFD*), close_range, closefrom.
 *
 * A written fd's close is journaled after the close returned (the data is then complete for this
 * fd); its name is taken before, while the fd still names the file, and its mark is cleared
 * before too: once the kernel frees the number, another thread's open may get it and mark it,
 * and clearing afterwards would erase that mark (its close then went unjournaled: found by the
 * full suite in the VM matrix, 8 threads writing). An fd replaced by dup2/dup3 is closed by the
 * kernel: that counts as a close (the number is never free there). A dup of a written fd is
 * written.
 */
#include "veloshim.h"

#include <stdarg.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

struct closing {
        int fd;
        struct velo_target t;
};

static int close_begin(int fd, struct closing *c)
{
        c->fd = fd;
        if (!velo_active || !velo_fd_written(fd) || velo_in_vfork_child())
                return 0;
        VELO_SAVE_ERRNO;
        velo_resolve_fd(fd, &c->t);
        VELO_RESTORE_ERRNO;
        return 1;
}

static void close_end(struct closing *c)
{
        VELO_SAVE_ERRNO;
        if (c->t.inside)
                velo_journal_target(VELO_R_CLOSE, VELO_P_EVENT, c->fd, 0, &c->t, NULL);
        VELO_RESTORE_ERRNO;
}

static int do_close(int fd)
{
        velo_init();
        struct closing c;
        int tracked = close_begin(fd, &c);
        if (tracked)
                velo_fd_clear(fd); /* before the number can be reused (see above) */
        int rc = REAL(close) != NULL ? REAL(close)(fd) : velo_sys_close(fd);
        if (tracked)
                close_end(&c); /* even on EINTR/EIO: Linux has released the fd */
        return rc;
}

VELO_EXPORT int close(int fd)
{
        return do_close(fd);
}

/* glibc's exported aliases of close, dup2 and fcntl (__fcntl below): other symbols, the same
 * functions. Called by name (old binaries, dlsym), they went past the hooks: a written fd
 * closed, replaced or duplicated so was never journaled nor marked. */
VELO_EXPORT int __close(int fd);
VELO_EXPORT int __close(int fd)
{
        return do_close(fd);
}

VELO_EXPORT int dup(int fd)
{
        velo_init();
        int nfd = REAL(dup) != NULL ? REAL(dup)(fd) : (int)syscall(SYS_dup, fd);
        if (nfd >= 0 && velo_active)
                velo_fd_copy(fd, nfd);
        return nfd;
}

static int do_dup3(int oldfd, int newfd, int flags, int is_dup2)
{
        velo_init();
        struct closing c;
        int tracked = oldfd != newfd && close_begin(newfd, &c);
        int rc;
        if (is_dup2)
                rc = REAL(dup2) != NULL ? REAL(dup2)(oldfd, newfd)
                                            : (int)syscall(SYS_dup3, oldfd, newfd, 0);
        else
                rc = REAL(dup3) != NULL ? REAL(dup3)(oldfd, newfd, flags)
                                            : (int)syscall(SYS_dup3, oldfd, newfd, flags);
        if (rc >= 0 && velo_active) {
                if (tracked) {
                        velo_fd_clear(newfd); /* the old file; velo_fd_copy marks the new one */
                        close_end(&c);
                }
                velo_fd_copy(oldfd, rc);
        }
        return rc;
}

VELO_EXPORT int dup2(int oldfd, int newfd)
{
        return do_dup3(oldfd, newfd, 0, 1);
}

VELO_EXPORT int __dup2(int oldfd, int newfd);
VELO_EXPORT int __dup2(int oldfd, int newfd)
{
        return do_dup3(oldfd, newfd, 0, 1);
}

VELO_EXPORT int dup3(int oldfd, int newfd, int flags)
{
        return do_dup3(oldfd, newfd, flags, 0);
}

/* fcntl is variadic; like glibc, pass the third argument on as a pointer-sized value. */
static int do_fcntl(int fd, int cmd, void *arg)
{
        velo_init();
        int rc = REAL(fcntl) != NULL ? REAL(fcntl)(fd, cmd, arg)
                                         : (int)syscall(SYS_fcntl, fd, cmd, arg);
        if (rc >= 0 && velo_active && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
                velo_fd_copy(fd, rc);
        return rc;
}

VELO_EXPORT int fcntl(int fd, int cmd, ...)
{
        va_list ap;
        va_start(ap, cmd);
        void *arg = va_arg(ap, void *);
        va_end(ap);
        return do_fcntl(fd, cmd, arg);
}

VELO_EXPORT int __fcntl(int fd, int cmd, ...);
VELO_EXPORT int __fcntl(int fd, int cmd, ...)
{
        va_list ap;
        va_start(ap, cmd);
        void *arg = va_arg(ap, void *);
        va_end(ap);
        return do_fcntl(fd, cmd, arg);
}

VELO_EXPORT int fcntl64(int fd, int cmd, ...)
{
        va_list ap;
        va_start(ap, cmd);
        void *arg = va_arg(ap, void *);
        va_end(ap);
        return do_fcntl(fd, cmd, arg);
}

/* Journal every written fd in [first, last] before a close_range/closefrom; after the call,
 * forget them. With CLOSE_RANGE_CLOEXEC nothing closes now: exec will (see exec.c). */
static void range_begin(unsigned first, unsigned last, int journal)
{
        if (!velo_active || velo_in_vfork_child())
                return;
        int top = velo_fd_max_marked();
        if (top < 0)
                return;
        if (last > (unsigned)top)
                last = (unsigned)top;
        for (unsigned fd = first; fd <= last; fd++) {
                if (!velo_fd_written((int)fd))
                        continue;
                if (journal)
                        velo_fd_journal_close((int)fd, 0);
                velo_fd_clear((int)fd);
        }
}

VELO_EXPORT int close_range(unsigned first, unsigned last, int flags)
{
        velo_init();
        if (!(flags & CLOSE_RANGE_CLOEXEC))
                range_begin(first, last, 1);
        if (REAL(close_range) != NULL)
                return REAL(close_range)(first, last, flags);
        return (int)syscall(SYS_close_range, first, last, flags);
}

VELO_EXPORT void closefrom(int lowfd)
{
        velo_init();
        if (lowfd >= 0)
                range_begin((unsigned)lowfd, ~0u, 1);
        if (REAL(closefrom) != NULL) {
                REAL(closefrom)(lowfd);
                return;
        }
        syscall(SYS_close_range, (unsigned)lowfd, ~0u, 0);
}
