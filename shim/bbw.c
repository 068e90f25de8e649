/* Break-Before-Write (--link mode only).
 *
 * In --link mode a Tier-2 file of the projection is a hard link to a per-(digest, mode) proxy
 * inode in the store, shared with every other path and session of that content. Before the first
 * call that would change such an inode (open for writing or truncating, truncate, chmod, chown,
 * utime, setxattr, link), the shim replaces the path by a private copy: copy to a temp name in the
 * same directory (reflink where the filesystem can), same mode and times, rename over. The check
 * and the swap run under a per-path lock (flock on <session>/locks/<hash of the path>.lock), so of
 * two writers of one file the second sees the private copy and both write to it: nothing is lost.
 *
 * The directory's times are put back afterwards (the swap is ours, not the program's). A program
 * that holds the proxy open for reading across the swap keeps reading the old bytes.
 */
#include "veloshim.h"

#include <linux/fs.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>

int velo_is_proxy(uint64_t dev, uint64_t ino)
{
        uint32_t n;
        const struct velo_proxy *p = velo_conf_proxies(&n);
        size_t lo = 0, hi = n;
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;
                if (p[mid].dev < dev || (p[mid].dev == dev && p[mid].ino < ino))
                        lo = mid + 1;
                else if (p[mid].dev == dev && p[mid].ino == ino)
                        return 1;
                else
                        hi = mid;
        }
        return 0;
}

static uint64_t fnv1a(const char *s, size_t n)
{
        uint64_t h = 0xcbf29ce484222325ull;
        for (size_t i = 0; i < n; i++) {
                h ^= (unsigned char)s[i];
                h *= 0x100000001b3ull;
        }
        return h;
}

static void hex64(uint64_t v, char out[17])
{
        static const char digits[] = "0123456789abcdef";
        for (int i = 15; i >= 0; i--) {
                out[i] = digits[v & 0xf];
                v >>= 4;
        }
        out[16] = '\0';
}

/* Bytes [from, to) of src to the same offsets of dst by read/write (copy_file_range refused). */
static int copy_range_rw(int src, int dst, off_t from, off_t to)
{
        char buf[65536];
        while (from < to) {
                size_t want = (size_t)(to - from) < sizeof buf ? (size_t)(to - from) : sizeof buf;
                long r = syscall(SYS_pread64, src, buf, want, from);
                if (r < 0 && errno == EINTR)
                        continue;
                if (r < 0)
                        return -1;
                if (r == 0)
                        return 0; /* shrank meanwhile: what is left is the size set below */
                for (long w = 0; w < r;) {
                        long k = syscall(SYS_pwrite64, dst, buf + w, (size_t)(r - w), from + w);
                        if (k < 0 && errno == EINTR)
                                continue;
                        if (k <= 0)
                                return -1;
                        w += k;
                }
                from += r;
        }
        return 0;
}

/* A private copy of the proxy: a reflink, else its data extents only (SEEK_DATA/SEEK_HOLE), so
 * a hole stays a hole as the materialised copy and `cp` keep them: a sparse disk image written
 * once must not become its size in zeros. The size is set at the end (a trailing hole). */
static int copy_data(int src, int dst, off_t size)
{
        if (syscall(SYS_ioctl, dst, FICLONE, src) == 0)
                return 0;
        off_t pos = 0;
        int by_rw = 0;
        while (pos < size) {
                off_t data = (off_t)syscall(SYS_lseek, src, pos, SEEK_DATA);
                off_t hole;
                if (data < 0 && errno == ENXIO)
                        break; /* nothing but a hole from pos on */
                if (data < 0) {
                        data = pos; /* the filesystem cannot say: one extent */
                        hole = size;
                } else {
                        hole = (off_t)syscall(SYS_lseek, src, data, SEEK_HOLE);
                        if (hole < 0 || hole > size)
                                hole = size;
                }
                if (data >= size)
                        break;
                int ended = 0;
                while (data < hole && !by_rw && !ended) {
                        loff_t in = data, out = data;
                        long n = syscall(SYS_copy_file_range, src, &in, dst, &out,
                                         (size_t)(hole - data), 0);
                        if (n < 0 && errno == EINTR)
                                continue;
                        if (n < 0)
                                by_rw = 1; /* refused (EXDEV, EINVAL...): read/write instead */
                        else if (n == 0)
                                ended = 1; /* the source shrank meanwhile */
                        else
                                data += n;
                }
                if (ended)
                        break;
                if (by_rw && copy_range_rw(src, dst, data, hole) < 0)
                        return -1;
                pos = hole;
        }
        return (int)syscall(SYS_ftruncate, dst, size) == 0 ? 0 : -1;
}

/* Under the lock: if `path` is still a proxy link, swap in a private copy. */
static int break_locked(struct velo_target *t)
{
        struct stat st;
        if (velo_sys_fstatat(AT_FDCWD, t->path, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                if (errno != ENOENT)
                        return -1;
                t->exists = 0;
                t->broke = 1; /* gone meanwhile: the call acts on the path, never the proxy */
                return 0;
        }
        if (!S_ISREG(st.st_mode) || !velo_is_proxy(st.st_dev, st.st_ino)) {
                /* another writer broke it first: the caller's handle may still be the proxy */
                t->st = st;
                t->broke = 1;
                return 0;
        }
        size_t slash = t->len;
        while (slash > 0 && t->path[slash - 1] != '/')
                slash--;
        if (slash == 0)
                return 0;
        char dir[PATH_MAX];
        memcpy(dir, t->path, slash - 1 ? slash - 1 : 1);
        dir[slash - 1 ? slash - 1 : 1] = '\0';
        struct stat dst_st;
        if (velo_sys_fstatat(AT_FDCWD, dir, &dst_st, 0) < 0)
                return -1;

        char tmp[PATH_MAX], num[24], h[17];
        static unsigned counter;
        unsigned seq = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
        const char *pid = velo_utoa((unsigned long)velo_sys_getpid(), num, sizeof num);
        hex64(fnv1a(t->path, t->len) ^ seq, h);
        size_t need = slash + sizeof ".velo-bbw." + strlen(pid) + 1 + 16;
        if (need >= sizeof tmp) {
                errno = ENAMETOOLONG;
                return -1;
        }
        size_t k = slash;
        memcpy(tmp, t->path, slash);
        memcpy(tmp + k, ".velo-bbw.", 10);
        k += 10;
        memcpy(tmp + k, pid, strlen(pid));
        k += strlen(pid);
        tmp[k++] = '.';
        memcpy(tmp + k, h, 16);
        k += 16;
        tmp[k] = '\0';

        int src = velo_sys_openat(AT_FDCWD, t->path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW, 0);
        if (src < 0)
                return -1;
        int chmodded = 0;
        int out = velo_sys_openat(AT_FDCWD, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
                                  0600);
        if (out < 0 && errno == EACCES && dst_st.st_uid == (uid_t)syscall(SYS_geteuid)) {
                /* a read-only directory of ours (0555): open it up for the swap only */
                if (syscall(SYS_fchmodat, AT_FDCWD, dir, (dst_st.st_mode & 07777) | 0200) == 0) {
                        chmodded = 1;
                        out = velo_sys_openat(AT_FDCWD, tmp,
                                              O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
                                              0600);
                }
        }
        int rc = -1, err = 0;
        if (out >= 0) {
                struct timespec times[2] = {st.st_atim, st.st_mtim};
                if (copy_data(src, out, st.st_size) == 0 &&
                    syscall(SYS_fchmod, out, st.st_mode & 07777) == 0 &&
                    syscall(SYS_utimensat, out, NULL, times, 0) == 0 &&
                    syscall(SYS_renameat, AT_FDCWD, tmp, AT_FDCWD, t->path) == 0)
                        rc = 0;
                else
                        err = errno;
                velo_sys_close(out);
                if (rc < 0)
                        syscall(SYS_unlinkat, AT_FDCWD, tmp, 0);
        } else {
                err = errno;
        }
        velo_sys_close(src);
        if (chmodded)
                syscall(SYS_fchmodat, AT_FDCWD, dir, dst_st.st_mode & 07777);
        struct timespec dtimes[2] = {dst_st.st_atim, dst_st.st_mtim};
        syscall(SYS_utimensat, AT_FDCWD, dir, dtimes, 0);
        if (rc < 0) {
                errno = err;
                return -1;
        }
        velo_journal(VELO_R_BBW, VELO_P_EVENT, 0, 0, st.st_dev, st.st_ino, t->path, t->len, NULL,
                     0, 0);
        velo_sys_fstatat(AT_FDCWD, t->path, &t->st, AT_SYMLINK_NOFOLLOW);
        t->broke = 1;
        return 0;
}

int velo_bbw(struct velo_target *t)
{
        if (!velo_conf_link_mode() || !t->exists || !S_ISREG(t->st.st_mode) ||
            t->st.st_nlink < 2 || !velo_is_proxy(t->st.st_dev, t->st.st_ino))
                return 0;
        char lock[PATH_MAX], h[17];
        const char *dir = velo_conf_locks();
        size_t dlen = strlen(dir);
        if (dlen + 1 + 16 + 5 + 1 > sizeof lock) {
                errno = ENAMETOOLONG;
                return -1;
        }
        hex64(fnv1a(t->path, t->len), h);
        memcpy(lock, dir, dlen);
        lock[dlen] = '/';
        memcpy(lock + dlen + 1, h, 16);
        memcpy(lock + dlen + 17, ".lock", 6);
        int lfd = velo_sys_openat(AT_FDCWD, lock, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (lfd < 0)
                return -1;
        if (TEMP_FAILURE_RETRY(syscall(SYS_flock, lfd, LOCK_EX)) < 0) {
                int e = errno;
                velo_sys_close(lfd);
                errno = e;
                return -1;
        }
        int rc = break_locked(t);
        int e = errno;
        velo_sys_close(lfd); /* releases the lock */
        errno = e;
        return rc;
}
