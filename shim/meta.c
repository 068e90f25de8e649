/* Changes to an inode's metadata: chmod, chown, setxattr/removexattr, utimensat and the older
 * utime calls (converted to utimensat, which is what glibc does too), and the inode flags that
 * chattr sets with ioctl.
 *
 * In --link mode each of these would change the shared proxy inode: Break-Before-Write first.
 * The fd forms then still hold the proxy, so after a break they act on the path instead.
 */
#include "veloshim.h"

#include <linux/fs.h>
#include <stdarg.h>
#include <sys/ioctl.h>
#include <sys/time.h>
#include <sys/xattr.h>
#include <utime.h>

/* After a Break-Before-Write, does fd still hold the old (shared) inode? */
static int fd_is_stale(int fd, const struct velo_target *t)
{
        struct stat st;
        if (!t->exists || velo_sys_fstat(fd, &st) < 0)
                return 0;
        return st.st_dev != t->st.st_dev || st.st_ino != t->st.st_ino;
}

static unsigned nofollow_flag(int flags)
{
        return (flags & AT_SYMLINK_NOFOLLOW) ? 0 : VELO_FOLLOW;
}

/* --- chmod ---------------------------------------------------------------------------------- */

/* (fd, "", AT_EMPTY_PATH) is the fd itself: glibc >= 2.39 passes it on to fchmodat2 (2.36 says
 * EINVAL). Taken for a name, it was resolved as "<file>/" and the proxy the fd holds never broke. */
static int do_fchmodat(int dirfd, const char *path, mode_t mode, int flags, int raw2)
{
        struct velo_target t;
        unsigned vf = VELO_WRITE | VELO_BBW | nofollow_flag(flags);
        if (flags & AT_EMPTY_PATH)
                vf |= VELO_EMPTY;
        int r = velo_pre1(VELO_R_CHMOD, mode, dirfd, path, vf, &t);
        if (r == VELO_DENY)
                return -1;
        if (r == VELO_TRACK && t.broke) {
                path = velo_redirect(&t, &dirfd, path);
                flags &= ~AT_EMPTY_PATH;
        }
        int rc = raw2                     ? (int)syscall(VELO_SYS_FCHMODAT2, dirfd, path, mode, flags)
                 : REAL(fchmodat) != NULL ? REAL(fchmodat)(dirfd, path, mode, flags)
                                          : (int)syscall(SYS_fchmodat, dirfd, path, mode);
        if (r == VELO_TRACK)
                velo_post(VELO_R_CHMOD, mode, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int chmod(const char *path, mode_t mode)
{
        return do_fchmodat(AT_FDCWD, path, mode, 0, 0);
}

VELO_EXPORT int fchmodat(int dirfd, const char *path, mode_t mode, int flags)
{
        return do_fchmodat(dirfd, path, mode, flags, 0);
}

/* glibc's lchmod calls its internal fchmodat, past the hook above */
VELO_EXPORT int lchmod(const char *path, mode_t mode)
{
        return do_fchmodat(AT_FDCWD, path, mode, AT_SYMLINK_NOFOLLOW, 0);
}

/* fchmodat2 made with syscall(3) (sysc.c): glibc's fchmodat is not that call before 2.39 */
int velo_fchmodat2(int dirfd, const char *path, mode_t mode, int flags)
{
        return do_fchmodat(dirfd, path, mode, flags, 1);
}

VELO_EXPORT int fchmod(int fd, mode_t mode)
{
        struct velo_target t;
        int r = velo_pre_fd(VELO_R_CHMOD, mode, fd, VELO_WRITE | VELO_BBW, &t);
        if (r == VELO_DENY)
                return -1;
        int rc;
        if (r == VELO_TRACK && fd_is_stale(fd, &t))
                rc = REAL(fchmodat)(AT_FDCWD, t.path, mode, 0);
        else
                rc = REAL(fchmod) != NULL ? REAL(fchmod)(fd, mode)
                                              : (int)syscall(SYS_fchmod, fd, mode);
        if (r == VELO_TRACK)
                velo_post(VELO_R_CHMOD, mode, &t, NULL, rc, errno);
        return rc;
}

/* --- chown ---------------------------------------------------------------------------------- */

static int do_fchownat(int dirfd, const char *path, uid_t uid, gid_t gid, int flags)
{
        struct velo_target t;
        unsigned vf = VELO_WRITE | VELO_BBW | nofollow_flag(flags);
        if (flags & AT_EMPTY_PATH)
                vf |= VELO_EMPTY;
        int r = velo_pre1(VELO_R_CHOWN, uid, dirfd, path, vf, &t);
        if (r == VELO_DENY)
                return -1;
        if (r == VELO_TRACK && t.broke) {
                path = velo_redirect(&t, &dirfd, path);
                flags &= ~AT_EMPTY_PATH;
        }
        int rc = REAL(fchownat) != NULL
                         ? REAL(fchownat)(dirfd, path, uid, gid, flags)
                         : (int)syscall(SYS_fchownat, dirfd, path, uid, gid, flags);
        if (r == VELO_TRACK)
                velo_post(VELO_R_CHOWN, uid, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int chown(const char *path, uid_t uid, gid_t gid)
{
        return do_fchownat(AT_FDCWD, path, uid, gid, 0);
}

VELO_EXPORT int lchown(const char *path, uid_t uid, gid_t gid)
{
        return do_fchownat(AT_FDCWD, path, uid, gid, AT_SYMLINK_NOFOLLOW);
}

VELO_EXPORT int fchownat(int dirfd, const char *path, uid_t uid, gid_t gid, int flags)
{
        return do_fchownat(dirfd, path, uid, gid, flags);
}

VELO_EXPORT int fchown(int fd, uid_t uid, gid_t gid)
{
        struct velo_target t;
        int r = velo_pre_fd(VELO_R_CHOWN, uid, fd, VELO_WRITE | VELO_BBW, &t);
        if (r == VELO_DENY)
                return -1;
        int rc;
        if (r == VELO_TRACK && fd_is_stale(fd, &t))
                rc = REAL(fchownat)(AT_FDCWD, t.path, uid, gid, 0);
        else
                rc = REAL(fchown) != NULL ? REAL(fchown)(fd, uid, gid)
                                              : (int)syscall(SYS_fchown, fd, uid, gid);
        if (r == VELO_TRACK)
                velo_post(VELO_R_CHOWN, uid, &t, NULL, rc, errno);
        return rc;
}

/* --- xattrs --------------------------------------------------------------------------------- */

VELO_EXPORT int setxattr(const char *path, const char *name, const void *value, size_t size,
                         int flags)
{
        struct velo_target t;
        int r = velo_pre1(VELO_R_XATTR, 0, AT_FDCWD, path, VELO_FOLLOW | VELO_WRITE | VELO_BBW,
                          &t);
        if (r == VELO_DENY)
                return -1;
        int cwd = AT_FDCWD;
        if (r == VELO_TRACK)
                path = velo_redirect(&t, &cwd, path);
        int rc = REAL(setxattr)(path, name, value, size, flags);
        if (r == VELO_TRACK)
                velo_post(VELO_R_XATTR, 0, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int lsetxattr(const char *path, const char *name, const void *value, size_t size,
                          int flags)
{
        struct velo_target t;
        int r = velo_pre1(VELO_R_XATTR, 0, AT_FDCWD, path, VELO_WRITE | VELO_BBW, &t);
        if (r == VELO_DENY)
                return -1;
        int cwd = AT_FDCWD;
        if (r == VELO_TRACK)
                path = velo_redirect(&t, &cwd, path);
        int rc = REAL(lsetxattr)(path, name, value, size, flags);
        if (r == VELO_TRACK)
                velo_post(VELO_R_XATTR, 0, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int fsetxattr(int fd, const char *name, const void *value, size_t size, int flags)
{
        struct velo_target t;
        int r = velo_pre_fd(VELO_R_XATTR, 0, fd, VELO_WRITE | VELO_BBW, &t);
        if (r == VELO_DENY)
                return -1;
        int rc;
        if (r == VELO_TRACK && fd_is_stale(fd, &t))
                rc = REAL(setxattr)(t.path, name, value, size, flags);
        else
                rc = REAL(fsetxattr)(fd, name, value, size, flags);
        if (r == VELO_TRACK)
                velo_post(VELO_R_XATTR, 0, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int removexattr(const char *path, const char *name)
{
        struct velo_target t;
        int r = velo_pre1(VELO_R_XATTR, 1, AT_FDCWD, path, VELO_FOLLOW | VELO_WRITE | VELO_BBW,
                          &t);
        if (r == VELO_DENY)
                return -1;
        int cwd = AT_FDCWD;
        if (r == VELO_TRACK)
                path = velo_redirect(&t, &cwd, path);
        int rc = REAL(removexattr)(path, name);
        if (r == VELO_TRACK)
                velo_post(VELO_R_XATTR, 1, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int lremovexattr(const char *path, const char *name)
{
        struct velo_target t;
        int r = velo_pre1(VELO_R_XATTR, 1, AT_FDCWD, path, VELO_WRITE | VELO_BBW, &t);
        if (r == VELO_DENY)
                return -1;
        int cwd = AT_FDCWD;
        if (r == VELO_TRACK)
                path = velo_redirect(&t, &cwd, path);
        int rc = REAL(lremovexattr)(path, name);
        if (r == VELO_TRACK)
                velo_post(VELO_R_XATTR, 1, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int fremovexattr(int fd, const char *name)
{
        struct velo_target t;
        int r = velo_pre_fd(VELO_R_XATTR, 1, fd, VELO_WRITE | VELO_BBW, &t);
        if (r == VELO_DENY)
                return -1;
        int rc;
        if (r == VELO_TRACK && fd_is_stale(fd, &t))
                rc = REAL(removexattr)(t.path, name);
        else
                rc = REAL(fremovexattr)(fd, name);
        if (r == VELO_TRACK)
                velo_post(VELO_R_XATTR, 1, &t, NULL, rc, errno);
        return rc;
}

/* --- times ---------------------------------------------------------------------------------- */

static int real_utimensat(int dirfd, const char *path, const struct timespec *ts, int flags)
{
        if (REAL(utimensat) != NULL)
                return REAL(utimensat)(dirfd, path, ts, flags);
        return (int)syscall(SYS_utimensat, dirfd, path, ts, flags);
}

/* utimensat(fd, NULL, ...) is futimens: the fd itself; so is (fd, "", AT_EMPTY_PATH). */
static int do_utimensat(int dirfd, const char *path, const struct timespec *ts, int flags)
{
        struct velo_target t;
        int r;
        int by_fd = path == NULL;
        unsigned vf = VELO_WRITE | VELO_BBW | nofollow_flag(flags);
        if (flags & AT_EMPTY_PATH)
                vf |= VELO_EMPTY;
        if (by_fd)
                r = velo_pre_fd(VELO_R_UTIME, 0, dirfd, VELO_WRITE | VELO_BBW, &t);
        else
                r = velo_pre1(VELO_R_UTIME, 0, dirfd, path, vf, &t);
        if (r == VELO_DENY)
                return -1;
        int rc;
        if (by_fd && r == VELO_TRACK && fd_is_stale(dirfd, &t))
                rc = real_utimensat(AT_FDCWD, t.path, ts, 0);
        else if (by_fd) /* glibc's utimensat refuses a NULL path: futimens is the fd form */
                rc = REAL(futimens) != NULL ? REAL(futimens)(dirfd, ts)
                                                : (int)syscall(SYS_utimensat, dirfd, NULL, ts, 0);
        else if (r == VELO_TRACK && t.broke)
                rc = real_utimensat(AT_FDCWD, t.path, ts, flags & ~AT_EMPTY_PATH);
        else
                rc = real_utimensat(dirfd, path, ts, flags);
        if (r == VELO_TRACK)
                velo_post(VELO_R_UTIME, 0, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int utimensat(int dirfd, const char *path, const struct timespec times[2], int flags)
{
        return do_utimensat(dirfd, path, times, flags);
}

VELO_EXPORT int futimens(int fd, const struct timespec times[2])
{
        return do_utimensat(fd, NULL, times, 0);
}

static const struct timespec *tv2ts(const struct timeval *tv, struct timespec ts[2])
{
        if (tv == NULL)
                return NULL;
        for (int i = 0; i < 2; i++) {
                ts[i].tv_sec = tv[i].tv_sec;
                ts[i].tv_nsec = tv[i].tv_usec * 1000;
        }
        return ts;
}

VELO_EXPORT int utimes(const char *path, const struct timeval times[2])
{
        struct timespec ts[2];
        return do_utimensat(AT_FDCWD, path, tv2ts(times, ts), 0);
}

VELO_EXPORT int lutimes(const char *path, const struct timeval times[2])
{
        struct timespec ts[2];
        return do_utimensat(AT_FDCWD, path, tv2ts(times, ts), AT_SYMLINK_NOFOLLOW);
}

VELO_EXPORT int futimes(int fd, const struct timeval times[2])
{
        struct timespec ts[2];
        return do_utimensat(fd, NULL, tv2ts(times, ts), 0);
}

VELO_EXPORT int futimesat(int dirfd, const char *path, const struct timeval times[2])
{
        struct timespec ts[2];
        return do_utimensat(dirfd, path, tv2ts(times, ts), 0);
}

VELO_EXPORT int utime(const char *path, const struct utimbuf *times)
{
        struct timespec ts[2];
        if (times != NULL) {
                ts[0].tv_sec = times->actime;
                ts[0].tv_nsec = 0;
                ts[1].tv_sec = times->modtime;
                ts[1].tv_nsec = 0;
        }
        return do_utimensat(AT_FDCWD, path, times != NULL ? ts : NULL, 0);
}

/* --- inode flags (chattr): ioctl on an fd, often opened read-only ------------------------------ */

/* Only the two requests that set an inode's flags are ours (journaled as XATTR, arg 2); every
 * other ioctl (ttys: hot) costs one comparison. chattr's read-only fd on a --link file holds the
 * shared proxy: unhooked, `chattr +i` (as root) or `+a` made every tree's proxy immutable. After
 * a break the private copy is opened by its path for the call. */
VELO_EXPORT int ioctl(int fd, unsigned long request, ...)
{
        static void *slot;
        int (*real)(int, unsigned long, ...) =
                (int (*)(int, unsigned long, ...))velo_sym(&slot, "ioctl");
        va_list ap;
        va_start(ap, request);
        void *arg = va_arg(ap, void *);
        va_end(ap);
        if (request != FS_IOC_SETFLAGS && request != FS_IOC_FSSETXATTR)
                return real != NULL ? real(fd, request, arg)
                                    : (int)syscall(SYS_ioctl, fd, request, arg);
        struct velo_target t;
        int r = velo_pre_fd(VELO_R_XATTR, 2, fd, VELO_WRITE | VELO_BBW, &t);
        if (r == VELO_DENY)
                return -1;
        int rc;
        if (r == VELO_TRACK && fd_is_stale(fd, &t)) {
                int nfd = velo_sys_openat(AT_FDCWD, t.path,
                                          O_RDONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC, 0);
                rc = nfd < 0 ? -1 : (int)syscall(SYS_ioctl, nfd, request, arg);
                if (nfd >= 0) {
                        int e = errno;
                        velo_sys_close(nfd);
                        errno = e;
                }
        } else {
                rc = (int)syscall(SYS_ioctl, fd, request, arg);
        }
        if (r == VELO_TRACK)
                velo_post(VELO_R_XATTR, 2, &t, NULL, rc, errno);
        return rc;
}
