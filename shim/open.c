/* Opening for writing: the open family (incl. the _FORTIFY_SOURCE entry points), creat, the
 * stdio openers (glibc's fopen calls its internal __open, not the PLT's open: measured), the
 * mkstemp family (same reason: sed -i), truncate/ftruncate.
 *
 * An open journals INTENT (flags, target path) before the call and DONE (fd, dev, ino) after; a
 * successful write-open marks the fd in the written-fd table so its close is journaled too.
 */
#include "veloshim.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

static int wants_write(int flags)
{
        return (flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC);
}

static int is_write_open(int flags)
{
        if (flags & O_PATH)
                return 0;
        return wants_write(flags) || (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
}

static int needs_mode(int flags)
{
        return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
}

static unsigned open_vflags(int flags)
{
        unsigned vf = VELO_WRITE;
        if (!(flags & O_NOFOLLOW) && !((flags & O_CREAT) && (flags & O_EXCL)))
                vf |= VELO_FOLLOW;
        if (wants_write(flags) && (flags & O_TMPFILE) != O_TMPFILE)
                vf |= VELO_BBW;
        return vf;
}

static int real_openat(int dirfd, const char *path, int flags, mode_t mode)
{
        if (REAL(openat) != NULL)
                return REAL(openat)(dirfd, path, flags, mode);
        return velo_sys_openat(dirfd, path, flags, mode);
}

static int do_openat(int dirfd, const char *path, int flags, mode_t mode)
{
        velo_init();
        if (!velo_active || !is_write_open(flags))
                return real_openat(dirfd, path, flags, mode);
        struct velo_target t;
        int r = velo_pre1(VELO_R_OPEN, (uint32_t)flags, dirfd, path, open_vflags(flags), &t);
        if (r == VELO_DENY)
                return -1;
        if (r == VELO_TRACK)
                path = velo_redirect(&t, &dirfd, path);
        int fd = real_openat(dirfd, path, flags, mode);
        if (r == VELO_TRACK) {
                int e = errno;
                if (fd >= 0)
                        velo_open_done(fd, &t, (uint32_t)flags);
                else
                        velo_post(VELO_R_OPEN, (uint32_t)flags, &t, NULL, -1, e);
                errno = e;
        }
        return fd;
}

/* openat2(2) has no glibc wrapper: programs reach it through syscall() (see sysc.c). Its
 * RESOLVE_* flags change how the path is walked (RESOLVE_IN_ROOT: "/" is dirfd), so the target is
 * found by the kernel itself, with an O_PATH openat2 under the same flags, and named from that fd.
 * A target that is not there yet is its parent plus the last name, as for openat. After a break
 * the private copy is opened by its canonical name: the walk the flags restrict was made. */
struct velo_open_how {
        uint64_t flags, mode, resolve;
};

static long raw_openat2(int dirfd, const char *path, const struct velo_open_how *how, size_t size)
{
        return syscall(SYS_openat2, dirfd, path, how, size);
}

/* Not there yet (a create): its parent found by the kernel under the same flags, plus the name. */
static int openat2_new(int dirfd, const char *path, int flags, uint64_t resolve,
                       struct velo_target *t)
{
        char dir[PATH_MAX];
        const char *base = strrchr(path, '/');
        size_t dlen = base == NULL ? 0 : (size_t)(base - path);
        int pfd = -1;
        if (base != NULL && dlen < sizeof dir - 1 && base[1] != '\0') {
                memcpy(dir, path, dlen);
                dir[dlen ? dlen : 1] = '\0';
                if (dlen == 0)
                        dir[0] = '/';
                struct velo_open_how ph = {(uint64_t)(O_PATH | O_DIRECTORY | O_CLOEXEC), 0, resolve};
                VELO_SAVE_ERRNO;
                pfd = (int)raw_openat2(dirfd, dir, &ph, sizeof ph);
                VELO_RESTORE_ERRNO;
        }
        int r = pfd >= 0 ? velo_pre1(VELO_R_OPEN, (uint32_t)flags, pfd, base + 1,
                                     open_vflags(flags), t)
                         : velo_pre1(VELO_R_OPEN, (uint32_t)flags, dirfd, path, open_vflags(flags),
                                     t);
        if (pfd >= 0) {
                int e = errno;
                velo_sys_close(pfd);
                errno = e;
        }
        return r;
}

long velo_openat2(int dirfd, const char *path, const void *vhow, size_t size)
{
        const struct velo_open_how *how = vhow;
        velo_init();
        if (!velo_active || how == NULL || size < sizeof *how || path == NULL ||
            how->flags > INT_MAX || !is_write_open((int)how->flags))
                return raw_openat2(dirfd, path, how, size);
        int flags = (int)how->flags;
        int nofollow = (flags & O_NOFOLLOW) || ((flags & O_CREAT) && (flags & O_EXCL));
        struct velo_open_how ph = {(uint64_t)(O_PATH | O_CLOEXEC | (nofollow ? O_NOFOLLOW : 0)),
                                   0, how->resolve};
        VELO_SAVE_ERRNO;
        int pfd = (int)raw_openat2(dirfd, path, &ph, sizeof ph);
        int perr = errno;
        VELO_RESTORE_ERRNO;
        if (pfd < 0 && perr != ENOENT && perr != EMFILE && perr != ENFILE)
                return raw_openat2(dirfd, path, how, size); /* fails as it would have */
        struct velo_target t;
        int r;
        if (pfd >= 0) {
                r = velo_pre1(VELO_R_OPEN, (uint32_t)flags, pfd, "", open_vflags(flags) | VELO_EMPTY,
                              &t);
                int e = errno;
                velo_sys_close(pfd);
                errno = e;
        } else {
                r = openat2_new(dirfd, path, flags, how->resolve, &t);
        }
        if (r == VELO_DENY)
                return -1;
        struct velo_open_how plain = {how->flags, how->mode, 0};
        long fd = r == VELO_TRACK && t.broke ? raw_openat2(AT_FDCWD, t.path, &plain, sizeof plain)
                                             : raw_openat2(dirfd, path, how, size);
        if (r == VELO_TRACK) {
                int e = errno;
                if (fd >= 0)
                        velo_open_done((int)fd, &t, (uint32_t)flags);
                else
                        velo_post(VELO_R_OPEN, (uint32_t)flags, &t, NULL, -1, e);
                errno = e;
        }
        return fd;
}

#define MODE_ARG(flags)                                                                            \
        mode_t mode = 0;                                                                           \
        if (needs_mode(flags)) {                                                                   \
                va_list ap;                                                                        \
                va_start(ap, flags);                                                               \
                mode = (mode_t)va_arg(ap, int);                                                    \
                va_end(ap);                                                                        \
        }

VELO_EXPORT int open(const char *path, int flags, ...)
{
        MODE_ARG(flags);
        return do_openat(AT_FDCWD, path, flags, mode);
}

VELO_EXPORT int open64(const char *path, int flags, ...)
{
        MODE_ARG(flags);
        return do_openat(AT_FDCWD, path, flags, mode);
}

VELO_EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
        MODE_ARG(flags);
        return do_openat(dirfd, path, flags, mode);
}

VELO_EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
        MODE_ARG(flags);
        return do_openat(dirfd, path, flags, mode);
}

/* exported aliases of open (glibc's own calls never come through them; programs may) */
VELO_EXPORT int __open(const char *path, int flags, ...);
VELO_EXPORT int __open(const char *path, int flags, ...)
{
        MODE_ARG(flags);
        return do_openat(AT_FDCWD, path, flags, mode);
}

VELO_EXPORT int __open64(const char *path, int flags, ...);
VELO_EXPORT int __open64(const char *path, int flags, ...)
{
        MODE_ARG(flags);
        return do_openat(AT_FDCWD, path, flags, mode);
}

/* _FORTIFY_SOURCE entry points: no mode (O_CREAT is refused by the fortified caller) */
VELO_EXPORT int __open_2(const char *path, int flags);
VELO_EXPORT int __open_2(const char *path, int flags)
{
        return do_openat(AT_FDCWD, path, flags, 0);
}
VELO_EXPORT int __open64_2(const char *path, int flags);
VELO_EXPORT int __open64_2(const char *path, int flags)
{
        return do_openat(AT_FDCWD, path, flags, 0);
}
VELO_EXPORT int __openat_2(int dirfd, const char *path, int flags);
VELO_EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
        return do_openat(dirfd, path, flags, 0);
}
VELO_EXPORT int __openat64_2(int dirfd, const char *path, int flags);
VELO_EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
        return do_openat(dirfd, path, flags, 0);
}

VELO_EXPORT int creat(const char *path, mode_t mode)
{
        return do_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

VELO_EXPORT int creat64(const char *path, mode_t mode)
{
        return do_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

/* open_by_handle_at names no path (and needs CAP_DAC_READ_SEARCH): the file is first found by
 * its handle with O_PATH and then treated as any write-open of that fd. It went past the shim
 * whole: no journal, no refusal in the store, a --link proxy written in place. A handle names an
 * inode, and a proxy's inode has a name in every tree that shares it (the kernel gives any one):
 * which of them was meant is unknown, so a proxy is refused (EROFS) as one reached by no path. */
VELO_EXPORT int open_by_handle_at(int mount_fd, struct file_handle *handle, int flags)
{
        static void *slot;
        int (*real)(int, struct file_handle *, int) =
                (int (*)(int, struct file_handle *, int))velo_sym(&slot, "open_by_handle_at");
        velo_init();
        if (real == NULL) {
                errno = ENOSYS;
                return -1;
        }
        if (!velo_active || !is_write_open(flags))
                return real(mount_fd, handle, flags);
        int pfd = real(mount_fd, handle, O_PATH | O_CLOEXEC);
        if (pfd < 0)
                return real(mount_fd, handle, flags); /* fails as it would have */
        struct velo_target t;
        int e = errno;
        velo_resolve_fd(pfd, &t);
        velo_sys_close(pfd);
        if (t.exists && S_ISREG(t.st.st_mode) && velo_conf_link_mode() &&
            velo_is_proxy(t.st.st_dev, t.st.st_ino))
                t.proxy = t.unknown = 1;
        errno = e;
        int r = velo_decide(VELO_R_OPEN, (uint32_t)flags, VELO_WRITE | VELO_BBW, &t, NULL);
        if (r == VELO_DENY)
                return -1;
        errno = e;
        int fd = real(mount_fd, handle, flags);
        if (r == VELO_TRACK) {
                e = errno;
                if (fd >= 0)
                        velo_open_done(fd, &t, (uint32_t)flags);
                else
                        velo_post(VELO_R_OPEN, (uint32_t)flags, &t, NULL, -1, e);
                errno = e;
        }
        return fd;
}

/* --- stdio ---------------------------------------------------------------------------------- */

/* The open(2) flags a fopen mode string means; -1 if unknown (the real fopen will say EINVAL). */
static int fopen_flags(const char *mode)
{
        int acc, fl = 0;
        if (mode == NULL)
                return -1;
        switch (mode[0]) {
        case 'r':
                acc = O_RDONLY;
                break;
        case 'w':
                acc = O_WRONLY;
                fl = O_CREAT | O_TRUNC;
                break;
        case 'a':
                acc = O_WRONLY;
                fl = O_CREAT | O_APPEND;
                break;
        default:
                return -1;
        }
        for (const char *p = mode + 1; *p && *p != ','; p++) {
                if (*p == '+')
                        acc = O_RDWR;
                else if (*p == 'x')
                        fl |= O_EXCL;
                else if (*p == 'e')
                        fl |= O_CLOEXEC;
        }
        return acc | fl;
}

FILE *velo_fopen(FILE *(*real)(const char *, const char *), const char *path, const char *mode)
{
        velo_init();
        if (real == NULL) {
                errno = ENOSYS;
                return NULL;
        }
        int fl = fopen_flags(mode);
        if (!velo_active || fl < 0 || !is_write_open(fl))
                return real(path, mode);
        struct velo_target t;
        int r = velo_pre1(VELO_R_OPEN, (uint32_t)fl, AT_FDCWD, path, open_vflags(fl), &t);
        if (r == VELO_DENY)
                return NULL;
        int cwd = AT_FDCWD;
        if (r == VELO_TRACK)
                path = velo_redirect(&t, &cwd, path);
        FILE *f = real(path, mode);
        if (r == VELO_TRACK) {
                int e = errno;
                if (f != NULL)
                        velo_open_done(fileno(f), &t, (uint32_t)fl);
                else
                        velo_post(VELO_R_OPEN, (uint32_t)fl, &t, NULL, -1, e);
                errno = e;
        }
        return f;
}

VELO_EXPORT FILE *fopen(const char *path, const char *mode)
{
        velo_init();
        return velo_fopen(REAL(fopen), path, mode);
}

VELO_EXPORT FILE *fopen64(const char *path, const char *mode)
{
        velo_init();
        return velo_fopen(REAL(fopen64) ? REAL(fopen64) : REAL(fopen), path, mode);
}

/* glibc's old exported alias of fopen (libio's name): the same function, past the hook above */
VELO_EXPORT FILE *_IO_fopen(const char *path, const char *mode);
VELO_EXPORT FILE *_IO_fopen(const char *path, const char *mode)
{
        static void *slot;
        velo_init();
        return velo_fopen((FILE * (*)(const char *, const char *)) velo_sym(&slot, "_IO_fopen"),
                          path, mode);
}

static FILE *do_freopen(FILE *(*real)(const char *, const char *, FILE *), const char *path,
                        const char *mode, FILE *stream)
{
        velo_init();
        if (real == NULL) {
                errno = ENOSYS;
                return NULL;
        }
        if (!velo_active)
                return real(path, mode, stream);
        int old = stream != NULL ? fileno(stream) : -1;
        struct velo_target closing;
        int was_written = velo_fd_written(old);
        if (was_written) {
                VELO_SAVE_ERRNO;
                velo_resolve_fd(old, &closing);
                VELO_RESTORE_ERRNO;
        }
        int fl = fopen_flags(mode);
        struct velo_target t;
        int r = VELO_PASS;
        if (fl >= 0 && is_write_open(fl)) {
                if (path != NULL)
                        r = velo_pre1(VELO_R_OPEN, (uint32_t)fl, AT_FDCWD, path, open_vflags(fl),
                                      &t);
                else if (old >= 0) /* glibc reopens the stream's own file: /proc/self/fd */
                        r = velo_pre_fd(VELO_R_OPEN, (uint32_t)fl, old,
                                        wants_write(fl) ? VELO_WRITE | VELO_BBW : VELO_WRITE, &t);
                if (r == VELO_DENY)
                        return NULL;
                int cwd = AT_FDCWD;
                if (r == VELO_TRACK)
                        path = velo_redirect(&t, &cwd, path);
        }
        FILE *f = real(path, mode, stream);
        int e = errno;
        if (was_written) {
                velo_fd_clear(old);
                if (closing.inside)
                        velo_journal_target(VELO_R_CLOSE, VELO_P_EVENT, old, 0, &closing, NULL);
        }
        if (r == VELO_TRACK) {
                if (f != NULL)
                        velo_open_done(fileno(f), &t, (uint32_t)fl);
                else
                        velo_post(VELO_R_OPEN, (uint32_t)fl, &t, NULL, -1, e);
        }
        errno = e;
        return f;
}

VELO_EXPORT FILE *freopen(const char *path, const char *mode, FILE *stream)
{
        velo_init();
        return do_freopen(REAL(freopen), path, mode, stream);
}

VELO_EXPORT FILE *freopen64(const char *path, const char *mode, FILE *stream)
{
        velo_init();
        return do_freopen(REAL(freopen64) ? REAL(freopen64) : REAL(freopen), path,
                          mode, stream);
}

int velo_fclose(int (*real)(FILE *), FILE *stream)
{
        velo_init();
        if (real == NULL) {
                errno = ENOSYS;
                return EOF;
        }
        int fd = (velo_active && stream != NULL) ? fileno(stream) : -1;
        if (!velo_fd_written(fd))
                return real(stream);
        struct velo_target t;
        VELO_SAVE_ERRNO;
        velo_resolve_fd(fd, &t);
        VELO_RESTORE_ERRNO;
        int rc = real(stream);
        int e = errno;
        velo_fd_clear(fd);
        if (t.inside)
                velo_journal_target(VELO_R_CLOSE, VELO_P_EVENT, fd, 0, &t, NULL);
        errno = e;
        return rc;
}

/* fclose closes through glibc's internal close: it is the close of a written stream. */
VELO_EXPORT int fclose(FILE *stream)
{
        velo_init();
        return velo_fclose(REAL(fclose), stream);
}

VELO_EXPORT int _IO_fclose(FILE *stream);
VELO_EXPORT int _IO_fclose(FILE *stream)
{
        static void *slot;
        return velo_fclose((int (*)(FILE *))velo_sym(&slot, "_IO_fclose"), stream);
}

/* --- mkstemp family: glibc creates the file through its internal open ---------------------- */

static int do_mkostemps(char *tmpl, int suffixlen, int flags)
{
        velo_init();
        if (REAL(mkostemps) == NULL) {
                errno = ENOSYS;
                return -1;
        }
        if (!velo_active)
                return REAL(mkostemps)(tmpl, suffixlen, flags);
        int fl = O_RDWR | O_CREAT | O_EXCL | flags;
        struct velo_target t;
        int r = velo_pre1(VELO_R_OPEN, (uint32_t)fl, AT_FDCWD, tmpl, VELO_WRITE, &t);
        if (r == VELO_DENY)
                return -1;
        int fd = REAL(mkostemps)(tmpl, suffixlen, flags);
        if (r == VELO_TRACK) {
                int e = errno;
                if (fd >= 0)
                        velo_open_done(fd, &t, (uint32_t)fl);
                else
                        velo_post(VELO_R_OPEN, (uint32_t)fl, &t, NULL, -1, e);
                errno = e;
        }
        return fd;
}

VELO_EXPORT int mkstemp(char *tmpl)
{
        return do_mkostemps(tmpl, 0, 0);
}
VELO_EXPORT int mkstemp64(char *tmpl)
{
        return do_mkostemps(tmpl, 0, 0);
}
VELO_EXPORT int mkostemp(char *tmpl, int flags)
{
        return do_mkostemps(tmpl, 0, flags);
}
VELO_EXPORT int mkostemp64(char *tmpl, int flags)
{
        return do_mkostemps(tmpl, 0, flags);
}
VELO_EXPORT int mkstemps(char *tmpl, int suffixlen)
{
        return do_mkostemps(tmpl, suffixlen, 0);
}
VELO_EXPORT int mkstemps64(char *tmpl, int suffixlen)
{
        return do_mkostemps(tmpl, suffixlen, 0);
}
VELO_EXPORT int mkostemps(char *tmpl, int suffixlen, int flags)
{
        return do_mkostemps(tmpl, suffixlen, flags);
}
VELO_EXPORT int mkostemps64(char *tmpl, int suffixlen, int flags)
{
        return do_mkostemps(tmpl, suffixlen, flags);
}

/* --- truncate ------------------------------------------------------------------------------- */

static int do_truncate(const char *path, off_t len)
{
        struct velo_target t;
        int r = velo_pre1(VELO_R_TRUNCATE, 0, AT_FDCWD, path,
                          VELO_FOLLOW | VELO_WRITE | VELO_BBW, &t);
        if (r == VELO_DENY)
                return -1;
        int cwd = AT_FDCWD;
        if (r == VELO_TRACK)
                path = velo_redirect(&t, &cwd, path);
        int rc = REAL(truncate) != NULL ? REAL(truncate)(path, len)
                                            : (int)syscall(SYS_truncate, path, len);
        if (r == VELO_TRACK)
                velo_post(VELO_R_TRUNCATE, 0, &t, NULL, rc, errno);
        return rc;
}

static int do_ftruncate(int fd, off_t len)
{
        struct velo_target t;
        int r = velo_pre_fd(VELO_R_TRUNCATE, 0, fd, VELO_WRITE, &t);
        if (r == VELO_DENY)
                return -1;
        int rc = REAL(ftruncate) != NULL ? REAL(ftruncate)(fd, len)
                                             : (int)syscall(SYS_ftruncate, fd, len);
        if (r == VELO_TRACK)
                velo_post(VELO_R_TRUNCATE, 0, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int truncate(const char *path, off_t len)
{
        return do_truncate(path, len);
}
VELO_EXPORT int truncate64(const char *path, off64_t len)
{
        return do_truncate(path, (off_t)len);
}
VELO_EXPORT int ftruncate(int fd, off_t len)
{
        return do_ftruncate(fd, len);
}
VELO_EXPORT int ftruncate64(int fd, off64_t len)
{
        return do_ftruncate(fd, (off_t)len);
}
