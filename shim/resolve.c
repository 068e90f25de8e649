/* Deciding whether a call touches the projection, by the target's identity rather than its text.
 *
 * A path is resolved the way the kernel will resolve it: open it with O_PATH (following a final
 * symlink only when the call does), then ask the kernel for the canonical name of that fd
 * (/proc/self/fd/N) and fstat it. A target that does not exist yet (create, mkdir, rename's
 * destination) is its resolved parent directory plus the last name, after following a dangling
 * symlink the call would follow (O_CREAT creates its target). So relative paths, dirfds,
 * `..`, and symlinks into or out of the projection all land where the kernel puts them. Only when
 * not even the parent resolves (the call will fail anyway) is the text compared as given.
 */
#include "veloshim.h"

#include <string.h>

static int has_prefix(const char *path, size_t len, const char *prefix, size_t plen)
{
        if (plen == 0 || len < plen || memcmp(path, prefix, plen) != 0)
                return 0;
        return len == plen || path[plen] == '/';
}

static void classify(struct velo_target *t)
{
        size_t rlen;
        const char *root = velo_conf_root(&rlen);
        t->inside = has_prefix(t->path, t->len, root, rlen);
        t->protect = 0;
        const char *p = velo_conf_protect();
        while (*p) {
                const char *end = strchr(p, ':');
                size_t plen = end ? (size_t)(end - p) : strlen(p);
                if (has_prefix(t->path, t->len, p, plen)) {
                        t->protect = 1;
                        break;
                }
                p += plen + (end ? 1 : 0);
        }
}

/* Canonical name of an fd; 0 on success. A deleted file has no name in any tree. */
static int fd_name(int fd, struct velo_target *t)
{
        ssize_t n = velo_sys_readlink_fd(fd, t->path, sizeof t->path - 1);
        if (n <= 0 || t->path[0] != '/')
                return -1;
        if ((size_t)n >= sizeof t->path - 1)
                t->trunc = 1;
        t->path[n] = '\0';
        t->len = (size_t)n;
        static const char deleted[] = " (deleted)";
        if (t->len > sizeof deleted - 1 &&
            memcmp(t->path + t->len - (sizeof deleted - 1), deleted, sizeof deleted - 1) == 0) {
                /* the kernel's mark of an unlinked file, or a name that ends so ("a (deleted)"
                 * is a valid file name): it is a name when it still leads to this very inode */
                struct stat fst, nst;
                if (t->trunc || velo_sys_fstat(fd, &fst) < 0 ||
                    velo_sys_fstatat(AT_FDCWD, t->path, &nst, AT_SYMLINK_NOFOLLOW) < 0 ||
                    fst.st_dev != nst.st_dev || fst.st_ino != nst.st_ino)
                        return -1;
        }
        return 0;
}

static void reset(struct velo_target *t)
{
        t->len = 0;
        t->path[0] = '\0';
        t->inside = t->protect = t->exists = t->trunc = t->unknown = t->proxy = t->broke = 0;
}

/* --link: is this inode one of the session's shared proxies? */
static int proxy_inode(const struct stat *st)
{
        return velo_conf_link_mode() && S_ISREG(st->st_mode) &&
               velo_is_proxy(st->st_dev, st->st_ino);
}

/* Text fallback: dirfd's name (or the cwd) joined with path, as given. */
static void textual(int dirfd, const char *path, struct velo_target *t)
{
        t->unknown = 1;
        size_t n = 0;
        if (path[0] != '/') {
                if (dirfd == AT_FDCWD) {
                        long r = syscall(SYS_getcwd, t->path, sizeof t->path - 2);
                        n = r > 0 ? strlen(t->path) : 0;
                } else {
                        ssize_t r = velo_sys_readlink_fd(dirfd, t->path, sizeof t->path - 2);
                        n = r > 0 ? (size_t)r : 0;
                }
                if (n == 0)
                        return;
                t->path[n++] = '/';
        }
        size_t plen = strlen(path);
        if (n + plen >= sizeof t->path) {
                plen = sizeof t->path - 1 - n;
                t->trunc = 1;
        }
        memcpy(t->path + n, path, plen);
        t->len = n + plen;
        t->path[t->len] = '\0';
        classify(t);
}

void velo_resolve_fd(int fd, struct velo_target *t)
{
        reset(t);
        if (velo_sys_fstat(fd, &t->st) == 0)
                t->exists = 1;
        if (fd_name(fd, t) < 0) {
                /* no name (deleted, or too long): a proxy stays known as one, to be refused */
                int proxy = t->exists && proxy_inode(&t->st);
                reset(t);
                t->unknown = 1;
                t->proxy = proxy;
                return;
        }
        classify(t);
}

static void resolve_path(int dirfd, const char *path, unsigned flags, struct velo_target *t,
                         int *nameless_proxy);

void velo_resolve(int dirfd, const char *path, unsigned flags, struct velo_target *t)
{
        int nameless_proxy = 0;
        resolve_path(dirfd, path, flags, t, &nameless_proxy);
        /* The kernel will act on a proxy inode we could not name (a /proc/self/fd/N link to a
         * proxy whose path was broken or removed, a path beyond PATH_MAX): what the text says
         * (the parent's name plus the last component) is not what gets changed. */
        if (nameless_proxy)
                t->proxy = 1;
}

/* The directory part of path ("." when it has none), into dir[PATH_MAX]; the length of path
 * without trailing slashes, or 0 when there is no last name to keep (empty, or too long). */
static size_t split_dir(const char *path, char *dir, size_t *slash)
{
        size_t plen = strlen(path);
        while (plen > 1 && path[plen - 1] == '/')
                plen--;
        if (plen == 0 || plen >= PATH_MAX)
                return 0;
        size_t s = plen;
        while (s > 0 && path[s - 1] != '/')
                s--;
        if (s == 0) {
                dir[0] = '.';
                dir[1] = '\0';
        } else {
                memcpy(dir, path, s);
                dir[s] = '\0';
        }
        *slash = s;
        return plen;
}

/* No fd free (the caller is at its fd limit): walk the path by its text the way the kernel will,
 * with fstatat and readlinkat, which need none. Without it the text was all there was: a symlink
 * of the tree into the store was not seen as the store, a proxy not as a proxy, and a chmod or
 * truncate (which need no fd) went through them. */
static void walk_text(int dirfd, const char *path, int follow, struct velo_target *t)
{
        char rest[PATH_MAX], next[PATH_MAX];
        size_t n = 0;
        reset(t);
        if (path[0] != '/') {
                ssize_t r = dirfd == AT_FDCWD
                                    ? (syscall(SYS_getcwd, t->path, sizeof t->path) > 0
                                               ? (ssize_t)strlen(t->path)
                                               : -1)
                                    : velo_sys_readlink_fd(dirfd, t->path, sizeof t->path - 1);
                if (r <= 0 || t->path[0] != '/') {
                        t->unknown = 1;
                        return;
                }
                n = t->path[r - 1] == '/' ? (size_t)r - 1 : (size_t)r; /* "/" is "" here */
        }
        size_t rlen = strlen(path);
        if (rlen >= sizeof rest) {
                textual(dirfd, path, t);
                return;
        }
        memcpy(rest, path, rlen + 1);
        const char *p = rest;
        int hops = 0, exists = 0;
        for (;;) {
                while (*p == '/')
                        p++;
                if (*p == '\0')
                        break;
                const char *q = p;
                while (*q && *q != '/')
                        q++;
                size_t clen = (size_t)(q - p);
                const char *after = q;
                while (*after == '/')
                        after++;
                int last = *after == '\0';
                exists = 0;
                if (clen == 1 && p[0] == '.') {
                        exists = 1;
                } else if (clen == 2 && p[0] == '.' && p[1] == '.') {
                        while (n > 0 && t->path[n - 1] != '/')
                                n--;
                        if (n > 0)
                                n--;
                        exists = 1;
                } else {
                        if (n + 1 + clen >= sizeof t->path) {
                                t->trunc = 1;
                                break;
                        }
                        size_t base = n;
                        t->path[n++] = '/';
                        memcpy(t->path + n, p, clen);
                        n += clen;
                        t->path[n] = '\0';
                        struct stat st;
                        if (velo_sys_fstatat(AT_FDCWD, t->path, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                                if (!last)
                                        t->unknown = 1; /* the call fails there too */
                                break;
                        }
                        exists = 1;
                        if (S_ISLNK(st.st_mode) && (!last || follow)) {
                                ssize_t l = (ssize_t)syscall(SYS_readlinkat, AT_FDCWD, t->path,
                                                             next, sizeof next - 1);
                                size_t tail = strlen(q);
                                if (l <= 0 || ++hops > 40 || (size_t)l + tail >= sizeof next) {
                                        t->unknown = 1;
                                        break;
                                }
                                memcpy(next + l, q, tail + 1); /* the link's text, then the rest */
                                memcpy(rest, next, (size_t)l + tail + 1);
                                p = rest;
                                n = next[0] == '/' ? 0 : base;
                                continue;
                        }
                }
                p = q;
        }
        if (n == 0)
                t->path[n++] = '/';
        t->path[n] = '\0';
        t->len = n;
        if (exists && velo_sys_fstatat(AT_FDCWD, t->path, &t->st, AT_SYMLINK_NOFOLLOW) == 0) {
                t->exists = 1;
                t->proxy = proxy_inode(&t->st);
        }
        classify(t);
}

/* Not there (yet): resolve the parent, keep the last name. */
static void resolve_parent(int dirfd, const char *path, struct velo_target *t)
{
        char dir[PATH_MAX];
        size_t slash = 0;
        size_t plen = split_dir(path, dir, &slash);
        if (plen == 0) {
                textual(dirfd, path, t);
                return;
        }
        const char *base = path + slash;
        size_t blen = plen - slash;
        int pfd = velo_sys_openat(dirfd, dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
        if (pfd < 0 && (errno == EMFILE || errno == ENFILE)) {
                walk_text(dirfd, path, 0, t);
                return;
        }
        if (pfd < 0) {
                textual(dirfd, path, t);
                return;
        }
        int ok = fd_name(pfd, t) == 0;
        velo_sys_close(pfd);
        if (!ok) {
                reset(t);
                textual(dirfd, path, t);
                return;
        }
        /* The parent's name may fill the buffer (a directory whose path is 4095 bytes long):
         * then there is room for neither the slash nor the name, and the record says it is cut. */
        if (t->len > 1 && t->len < sizeof t->path - 1) /* "/" stays "/" */
                t->path[t->len++] = '/';
        size_t room = sizeof t->path - 1 - t->len;
        if (blen > room) {
                t->trunc = 1;
                blen = room;
        }
        memcpy(t->path + t->len, base, blen);
        t->len += blen;
        t->path[t->len] = '\0';
        classify(t);
}

/* path names a symlink whose target does not exist: the kernel's O_CREAT follows it and creates
 * the target. Replace (dirfd, path) by (the link's directory, the link's text); 0 if it is no
 * such link. *owned is the directory fd this opened (closed by the caller). */
static int next_link(int *dirfd, const char **path, int *owned, char link[PATH_MAX])
{
        char dir[PATH_MAX];
        size_t slash = 0;
        if (split_dir(*path, dir, &slash) == 0)
                return 0;
        int lfd = velo_sys_openat(*dirfd, *path, O_PATH | O_NOFOLLOW | O_CLOEXEC, 0);
        if (lfd < 0)
                return 0;
        struct stat st;
        ssize_t n = -1;
        if (velo_sys_fstat(lfd, &st) == 0 && S_ISLNK(st.st_mode))
                n = (ssize_t)syscall(SYS_readlinkat, lfd, "", link, PATH_MAX - 1);
        int pfd = n > 0 ? velo_sys_openat(*dirfd, dir, O_PATH | O_DIRECTORY | O_CLOEXEC, 0) : -1;
        velo_sys_close(lfd);
        if (pfd < 0)
                return 0;
        link[n] = '\0';
        if (*owned >= 0)
                velo_sys_close(*owned);
        *owned = *dirfd = pfd;
        *path = link;
        return 1;
}

static void resolve_path(int dirfd, const char *path, unsigned flags, struct velo_target *t,
                         int *nameless_proxy)
{
        reset(t);
        if (path == NULL) {
                t->unknown = 1;
                return;
        }
        if (path[0] == '\0' && (flags & VELO_EMPTY)) {
                velo_resolve_fd(dirfd, t);
                return;
        }
        int oflags = O_PATH | O_CLOEXEC | ((flags & VELO_FOLLOW) ? 0 : O_NOFOLLOW);
        char link[PATH_MAX];
        int owned = -1;
        for (int hops = 0;; hops++) {
                int fd = path[0] ? velo_sys_openat(dirfd, path, oflags, 0) : -1;
                if (fd >= 0) {
                        int have = velo_sys_fstat(fd, &t->st) == 0;
                        int ok = have && fd_name(fd, t) == 0;
                        velo_sys_close(fd);
                        if (ok) {
                                t->exists = 1;
                                t->proxy = proxy_inode(&t->st);
                                classify(t);
                                goto out;
                        }
                        *nameless_proxy = have && proxy_inode(&t->st);
                        reset(t);
                        break;
                }
                if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {
                        walk_text(dirfd, path, (flags & VELO_FOLLOW) != 0, t);
                        goto out;
                }
                /* a dangling symlink is followed to where the call will create its target
                 * (as many links as the kernel follows) */
                if (!(flags & VELO_FOLLOW) || hops >= 40 ||
                    !next_link(&dirfd, &path, &owned, link))
                        break;
        }
        resolve_parent(dirfd, path, t);
out:
        if (owned >= 0)
                velo_sys_close(owned);
}

/* Common tail of the pre-call checks: refuse store writes, break shared inodes, journal. */
int velo_decide(int type, uint32_t arg, unsigned flags, struct velo_target *t1,
                struct velo_target *t2)
{
        int ours = t1->inside || (t2 != NULL && t2->inside);
        int guarded = ((flags & VELO_WRITE) && t1->protect);
        if (guarded) {
                velo_journal_target(VELO_R_DENIED, VELO_P_EVENT, -EROFS, (uint32_t)type, t1, t2);
                errno = EROFS;
                return VELO_DENY;
        }
        if ((flags & VELO_BBW) && t1->proxy && (!t1->inside || t1->unknown || t1->trunc)) {
                /* A shared proxy reached by no path of ours that could be broken (a magic link
                 * whose path was broken or removed, a path too long to name, a link moved out
                 * of the tree, no fd free to name it with): never write through it. */
                velo_journal_target(VELO_R_DENIED, VELO_P_EVENT, -EROFS, (uint32_t)type, t1, t2);
                errno = EROFS;
                return VELO_DENY;
        }
        if (!ours)
                return VELO_PASS;
        if ((flags & VELO_BBW) && t1->inside && velo_bbw(t1) < 0)
                return VELO_DENY; /* never write through a shared inode */
        velo_checkin_live();
        velo_journal_target(type, VELO_P_INTENT, 0, arg, t1, t2);
        return VELO_TRACK;
}

int velo_pre1(int type, uint32_t arg, int dirfd, const char *path, unsigned flags,
              struct velo_target *t)
{
        velo_init();
        if (!velo_active)
                return VELO_PASS;
        VELO_SAVE_ERRNO;
        velo_resolve(dirfd, path, flags, t);
        int r = velo_decide(type, arg, flags, t, NULL);
        if (r != VELO_DENY)
                VELO_RESTORE_ERRNO;
        return r;
}

int velo_pre_fd(int type, uint32_t arg, int fd, unsigned flags, struct velo_target *t)
{
        velo_init();
        if (!velo_active)
                return VELO_PASS;
        VELO_SAVE_ERRNO;
        velo_resolve_fd(fd, t);
        int r = velo_decide(type, arg, flags, t, NULL);
        if (r != VELO_DENY)
                VELO_RESTORE_ERRNO;
        return r;
}

int velo_pre2(int type, uint32_t arg, int dirfd1, const char *p1, unsigned f1, int dirfd2,
              const char *p2, unsigned f2, struct velo_target *t1, struct velo_target *t2)
{
        velo_init();
        if (!velo_active)
                return VELO_PASS;
        VELO_SAVE_ERRNO;
        velo_resolve(dirfd1, p1, f1, t1);
        velo_resolve(dirfd2, p2, f2, t2);
        if ((f2 & VELO_WRITE) && t2->protect) {
                velo_journal_target(VELO_R_DENIED, VELO_P_EVENT, -EROFS, (uint32_t)type, t2, t1);
                errno = EROFS;
                return VELO_DENY;
        }
        int r = velo_decide(type, arg, f1, t1, t2);
        if (r != VELO_DENY)
                VELO_RESTORE_ERRNO;
        return r;
}

void velo_post(int type, uint32_t arg, const struct velo_target *t1,
               const struct velo_target *t2, long ret, int err)
{
        VELO_SAVE_ERRNO;
        velo_journal_target(type, VELO_P_DONE, ret < 0 ? -err : (int32_t)ret, arg, t1, t2);
        VELO_RESTORE_ERRNO;
}
