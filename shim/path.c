/* Changes to names: rename(at)(2), unlink(at), rmdir, link(at), symlink(at), mkdir(at), mknod(at),
 * mkfifo(at), mkdtemp.
 *
 * Each acts on the name itself, so a final symlink is never followed (link() follows its source
 * only with AT_SYMLINK_FOLLOW). A rename is ours when either side is in the projection (a file
 * arriving from outside or leaving it). link() breaks a shared proxy first, so a hard link made in
 * the session shares a private inode, as it would in a real directory.
 */
#include "veloshim.h"

#include <stdio.h>
#include <string.h>

#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

/* --link: a name that leaves the tree (renamed out, or exchanged with a name outside) must not
 * take a proxy link along, or any later write there — after the session, without the shim —
 * changes the shared proxy. A proxy is broken first (the private copy leaves); a directory, whose
 * files may be proxies, cannot leave by rename: EXDEV, which mv and shutil.move answer by copying.
 * Returns 0 or the errno to fail with. */
static int leave_tree(struct velo_target *t1, struct velo_target *t2, unsigned flags,
                      int *olddirfd, const char **oldpath, int *newdirfd, const char **newpath)
{
        struct velo_target *leaving = NULL;
        int *dirfd = olddirfd;
        const char **path = oldpath;
        if (t1->inside && !t2->inside) {
                leaving = t1;
        } else if ((flags & RENAME_EXCHANGE) && t2->inside && !t1->inside) {
                leaving = t2;
                dirfd = newdirfd;
                path = newpath;
        }
        if (leaving == NULL || !leaving->exists)
                return 0;
        if (S_ISDIR(leaving->st.st_mode))
                return EXDEV;
        if (velo_bbw(leaving) < 0)
                return errno;
        *path = velo_redirect(leaving, dirfd, *path);
        return 0;
}

static int do_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                        unsigned flags)
{
        struct velo_target t1, t2;
        int r = velo_pre2(VELO_R_RENAME, flags, olddirfd, oldpath, VELO_WRITE, newdirfd, newpath,
                          VELO_WRITE, &t1, &t2);
        if (r == VELO_DENY)
                return -1;
        if (r == VELO_TRACK && velo_conf_link_mode()) {
                int e = leave_tree(&t1, &t2, flags, &olddirfd, &oldpath, &newdirfd, &newpath);
                if (e != 0) {
                        velo_post(VELO_R_RENAME, flags, &t1, &t2, -1, e);
                        errno = e;
                        return -1;
                }
        }
        int rc;
        if (REAL(renameat2) != NULL)
                rc = REAL(renameat2)(olddirfd, oldpath, newdirfd, newpath, flags);
        else
                rc = (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
        if (r == VELO_TRACK)
                velo_post(VELO_R_RENAME, flags, &t1, &t2, rc, errno);
        return rc;
}

VELO_EXPORT int rename(const char *oldpath, const char *newpath)
{
        return do_renameat2(AT_FDCWD, oldpath, AT_FDCWD, newpath, 0);
}

VELO_EXPORT int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath)
{
        return do_renameat2(olddirfd, oldpath, newdirfd, newpath, 0);
}

VELO_EXPORT int renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                          unsigned flags)
{
        return do_renameat2(olddirfd, oldpath, newdirfd, newpath, flags);
}

static int do_unlinkat(int dirfd, const char *path, int flags)
{
        int type = (flags & AT_REMOVEDIR) ? VELO_R_RMDIR : VELO_R_UNLINK;
        struct velo_target t;
        int r = velo_pre1(type, (uint32_t)flags, dirfd, path, VELO_WRITE, &t);
        if (r == VELO_DENY)
                return -1;
        int rc = REAL(unlinkat) != NULL ? REAL(unlinkat)(dirfd, path, flags)
                                            : (int)syscall(SYS_unlinkat, dirfd, path, flags);
        if (r == VELO_TRACK)
                velo_post(type, (uint32_t)flags, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int unlink(const char *path)
{
        return do_unlinkat(AT_FDCWD, path, 0);
}

VELO_EXPORT int unlinkat(int dirfd, const char *path, int flags)
{
        return do_unlinkat(dirfd, path, flags);
}

VELO_EXPORT int rmdir(const char *path)
{
        return do_unlinkat(AT_FDCWD, path, AT_REMOVEDIR);
}

/* glibc's remove unlinks through its internal unlinkat, past the hooks above: do what it does */
VELO_EXPORT int remove(const char *path)
{
        if (do_unlinkat(AT_FDCWD, path, 0) == 0)
                return 0;
        if (errno != EISDIR)
                return -1;
        return do_unlinkat(AT_FDCWD, path, AT_REMOVEDIR);
}

static int do_linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                     int flags)
{
        unsigned f1 = VELO_WRITE | VELO_BBW;
        if (flags & AT_SYMLINK_FOLLOW)
                f1 |= VELO_FOLLOW;
        if (flags & AT_EMPTY_PATH)
                f1 |= VELO_EMPTY;
        struct velo_target t1, t2;
        int r = velo_pre2(VELO_R_LINK, (uint32_t)flags, olddirfd, oldpath, f1, newdirfd, newpath,
                          VELO_WRITE, &t1, &t2);
        if (r == VELO_DENY)
                return -1;
        if (r == VELO_TRACK && t1.broke) { /* link the private copy, not the caller's proxy fd */
                oldpath = velo_redirect(&t1, &olddirfd, oldpath);
                flags &= ~AT_EMPTY_PATH;
        }
        int rc = REAL(linkat) != NULL
                         ? REAL(linkat)(olddirfd, oldpath, newdirfd, newpath, flags)
                         : (int)syscall(SYS_linkat, olddirfd, oldpath, newdirfd, newpath, flags);
        if (r == VELO_TRACK)
                velo_post(VELO_R_LINK, (uint32_t)flags, &t1, &t2, rc, errno);
        return rc;
}

VELO_EXPORT int link(const char *oldpath, const char *newpath)
{
        return do_linkat(AT_FDCWD, oldpath, AT_FDCWD, newpath, 0);
}

VELO_EXPORT int linkat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath,
                       int flags)
{
        return do_linkat(olddirfd, oldpath, newdirfd, newpath, flags);
}

static int do_symlinkat(const char *target, int dirfd, const char *linkpath)
{
        velo_init();
        int r = VELO_PASS;
        struct velo_target t, text;
        if (velo_active && target != NULL) {
                VELO_SAVE_ERRNO;
                velo_resolve(dirfd, linkpath, 0, &t);
                /* the target is content, not a place: journal its text as given */
                size_t n = strlen(target);
                text.len = n < sizeof text.path - 1 ? n : sizeof text.path - 1;
                memcpy(text.path, target, text.len);
                text.path[text.len] = '\0';
                text.trunc = n != text.len;
                text.inside = text.protect = text.exists = text.unknown = 0;
                text.proxy = text.broke = 0;
                r = velo_decide(VELO_R_SYMLINK, 0, VELO_WRITE, &t, &text);
                if (r == VELO_DENY)
                        return -1;
                VELO_RESTORE_ERRNO;
        }
        int rc = REAL(symlinkat) != NULL ? REAL(symlinkat)(target, dirfd, linkpath)
                                             : (int)syscall(SYS_symlinkat, target, dirfd, linkpath);
        if (r == VELO_TRACK)
                velo_post(VELO_R_SYMLINK, 0, &t, &text, rc, errno);
        return rc;
}

VELO_EXPORT int symlink(const char *target, const char *linkpath)
{
        return do_symlinkat(target, AT_FDCWD, linkpath);
}

VELO_EXPORT int symlinkat(const char *target, int dirfd, const char *linkpath)
{
        return do_symlinkat(target, dirfd, linkpath);
}

static int do_mkdirat(int dirfd, const char *path, mode_t mode)
{
        struct velo_target t;
        int r = velo_pre1(VELO_R_MKDIR, (uint32_t)mode, dirfd, path, VELO_WRITE, &t);
        if (r == VELO_DENY)
                return -1;
        int rc = REAL(mkdirat) != NULL ? REAL(mkdirat)(dirfd, path, mode)
                                           : (int)syscall(SYS_mkdirat, dirfd, path, mode);
        if (r == VELO_TRACK)
                velo_post(VELO_R_MKDIR, (uint32_t)mode, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int mkdir(const char *path, mode_t mode)
{
        return do_mkdirat(AT_FDCWD, path, mode);
}

VELO_EXPORT int mkdirat(int dirfd, const char *path, mode_t mode)
{
        return do_mkdirat(dirfd, path, mode);
}

/* mknod/mkfifo make a name (a fifo, a device, or an empty regular file) without an open. */
static int do_mknodat(int dirfd, const char *path, mode_t mode, dev_t dev)
{
        struct velo_target t;
        int r = velo_pre1(VELO_R_MKNOD, (uint32_t)mode, dirfd, path, VELO_WRITE, &t);
        if (r == VELO_DENY)
                return -1;
        int rc = REAL(mknodat) != NULL ? REAL(mknodat)(dirfd, path, mode, dev)
                                           : (int)syscall(SYS_mknodat, dirfd, path, mode, dev);
        if (r == VELO_TRACK)
                velo_post(VELO_R_MKNOD, (uint32_t)mode, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int mknod(const char *path, mode_t mode, dev_t dev)
{
        return do_mknodat(AT_FDCWD, path, mode, dev);
}

VELO_EXPORT int mknodat(int dirfd, const char *path, mode_t mode, dev_t dev)
{
        return do_mknodat(dirfd, path, mode, dev);
}

/* The entry points of binaries built against glibc < 2.33 (its mknod was a macro over them). The
 * version argument is glibc's to check: the real function is called, not mknodat. */
static int do_xmknodat(int ver, int dirfd, const char *path, mode_t mode, dev_t *dev)
{
        static void *real;
        int (*fn)(int, int, const char *, mode_t, dev_t *) =
                (int (*)(int, int, const char *, mode_t, dev_t *))velo_sym(&real, "__xmknodat");
        if (fn == NULL) {
                errno = ENOSYS;
                return -1;
        }
        struct velo_target t;
        int r = velo_pre1(VELO_R_MKNOD, (uint32_t)mode, dirfd, path, VELO_WRITE, &t);
        if (r == VELO_DENY)
                return -1;
        int rc = fn(ver, dirfd, path, mode, dev);
        if (r == VELO_TRACK)
                velo_post(VELO_R_MKNOD, (uint32_t)mode, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int __xmknod(int ver, const char *path, mode_t mode, dev_t *dev);
VELO_EXPORT int __xmknod(int ver, const char *path, mode_t mode, dev_t *dev)
{
        return do_xmknodat(ver, AT_FDCWD, path, mode, dev);
}

VELO_EXPORT int __xmknodat(int ver, int dirfd, const char *path, mode_t mode, dev_t *dev);
VELO_EXPORT int __xmknodat(int ver, int dirfd, const char *path, mode_t mode, dev_t *dev)
{
        return do_xmknodat(ver, dirfd, path, mode, dev);
}

VELO_EXPORT int mkfifo(const char *path, mode_t mode)
{
        return do_mknodat(AT_FDCWD, path, S_IFIFO | mode, 0);
}

VELO_EXPORT int mkfifoat(int dirfd, const char *path, mode_t mode)
{
        return do_mknodat(dirfd, path, S_IFIFO | mode, 0);
}

/* mkdtemp makes its directory through glibc's internal mkdir: the intent names the template
 * (its parent is what changes), the completion the directory made. */
VELO_EXPORT char *mkdtemp(char *tmpl)
{
        struct velo_target t;
        int r = velo_pre1(VELO_R_MKDIR, 0700, AT_FDCWD, tmpl, VELO_WRITE, &t);
        if (r == VELO_DENY)
                return NULL;
        if (REAL(mkdtemp) == NULL) {
                errno = ENOSYS;
                return NULL;
        }
        char *res = REAL(mkdtemp)(tmpl);
        if (r == VELO_TRACK) {
                int e = errno;
                if (res != NULL)
                        velo_resolve(AT_FDCWD, res, 0, &t);
                velo_post(VELO_R_MKDIR, 0700, &t, NULL, res != NULL ? 0 : -1, e);
                errno = e;
        }
        return res;
}
