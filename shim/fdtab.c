/* The process-wide table of written fds (review §3: track only what was opened for writing).
 *
 * One byte per fd number, sized to the hard RLIMIT_NOFILE (capped at fs.nr_open's default), in an
 * anonymous MAP_NORESERVE mapping: only the pages of fd numbers actually used cost memory, a
 * process with 1,000 open files touches one page. Updates are relaxed atomic byte stores, so
 * threads need no lock and a fork child simply owns its copy. A vfork child never writes it.
 */
#include "veloshim.h"

#include <poll.h>
#include <time.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#define FD_CAP (1u << 20)

static unsigned char *fdtab;
static size_t fdtab_n;
static int fd_max_marked = -1;

void velo_fdtab_init(void)
{
        struct rlimit rl;
        size_t n = 1024;
        if (syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, NULL, &rl) == 0)
                n = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > FD_CAP ? FD_CAP
                                                                         : (size_t)rl.rlim_max;
        if (n < 1024)
                n = 1024;
        void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED)
                return; /* untracked: the journal's intents and the final stat-diff still hold */
        fdtab = p;
        fdtab_n = n;
}

void velo_fd_mark(int fd)
{
        if (fd < 0 || (size_t)fd >= fdtab_n || velo_in_vfork_child())
                return;
        __atomic_store_n(&fdtab[fd], 1, __ATOMIC_RELAXED);
        int cur = __atomic_load_n(&fd_max_marked, __ATOMIC_RELAXED);
        while (fd > cur && !__atomic_compare_exchange_n(&fd_max_marked, &cur, fd, 1,
                                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                ;
}

int velo_fd_written(int fd)
{
        return fd >= 0 && (size_t)fd < fdtab_n && __atomic_load_n(&fdtab[fd], __ATOMIC_RELAXED);
}

int velo_fd_max_marked(void)
{
        return __atomic_load_n(&fd_max_marked, __ATOMIC_RELAXED);
}

void velo_fd_clear(int fd)
{
        if (fd >= 0 && (size_t)fd < fdtab_n && !velo_in_vfork_child())
                __atomic_store_n(&fdtab[fd], 0, __ATOMIC_RELAXED);
}

void velo_fd_copy(int from, int to)
{
        if (velo_fd_written(from))
                velo_fd_mark(to);
        else if (velo_fd_written(to))
                velo_fd_clear(to);
}

/* Journal that a written fd is (about to be) closed; `why`: 0 close, 1 exec, 2 exit. */
void velo_fd_journal_close(int fd, uint32_t why)
{
        VELO_SAVE_ERRNO;
        struct velo_target t;
        velo_resolve_fd(fd, &t);
        if (t.inside)
                velo_journal_target(VELO_R_CLOSE, VELO_P_EVENT, fd, why, &t, NULL);
        VELO_RESTORE_ERRNO;
}

void velo_fd_close_all_marked(uint32_t why, int only_cloexec)
{
        int top = __atomic_load_n(&fd_max_marked, __ATOMIC_RELAXED);
        for (int fd = 0; fd <= top && (size_t)fd < fdtab_n; fd++) {
                if (!velo_fd_written(fd))
                        continue;
                if (only_cloexec) {
                        long fl = syscall(SYS_fcntl, fd, F_GETFD);
                        if (fl < 0 || !(fl & FD_CLOEXEC))
                                continue;
                }
                velo_fd_journal_close(fd, why);
        }
}

/* A journaled open succeeded: remember the fd, journal its identity. */
void velo_open_done(int fd, const struct velo_target *t, uint32_t arg)
{
        VELO_SAVE_ERRNO;
        struct velo_target now;
        velo_resolve_fd(fd, &now);
        if (now.len == 0) /* O_TMPFILE or already unlinked: keep the name we resolved */
                velo_journal(VELO_R_OPEN, VELO_P_DONE, fd, arg, now.exists ? now.st.st_dev : 0,
                             now.exists ? now.st.st_ino : 0, t->path, t->len, NULL, 0, 0);
        else
                velo_journal_target(VELO_R_OPEN, VELO_P_DONE, fd, arg, &now, NULL);
        if ((arg & O_ACCMODE) != O_RDONLY || (arg & O_TRUNC))
                velo_fd_mark(fd);
        VELO_RESTORE_ERRNO;
}

/* After exec: fds this image inherited open for writing into the projection (a shell's `>`
 * redirection, `exec 3>>log`) are ours to watch too. Which fds are open is asked with poll()
 * (POLLNVAL marks a closed one), 256 at a time up to SCAN_MAX: far cheaper at start-up than
 * listing /proc/self/fd (measured: ~50 us of each exec'd program). An inherited written fd above
 * SCAN_MAX, or above the soft RLIMIT_NOFILE (ppoll takes no more), is not tracked: its opener
 * journaled it, and the stat-diff sees the result. */
#define SCAN_MAX 1024
#define SCAN_CHUNK 256

void velo_fd_scan_inherited(void)
{
        /* ppoll refuses more fds than the soft RLIMIT_NOFILE (EINVAL): `ulimit -n 100` */
        struct rlimit rl;
        int limit = SCAN_MAX;
        if (syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, NULL, &rl) == 0 && rl.rlim_cur < SCAN_MAX)
                limit = (int)rl.rlim_cur;
        struct pollfd pfd[SCAN_CHUNK];
        for (int base = 0; base < limit; base += SCAN_CHUNK) {
                int n = limit - base < SCAN_CHUNK ? limit - base : SCAN_CHUNK;
                for (int i = 0; i < n; i++) {
                        pfd[i].fd = base + i;
                        pfd[i].events = 0;
                        pfd[i].revents = 0;
                }
                struct timespec zero = {0, 0}; /* ppoll: every architecture has it, poll not */
                if (syscall(SYS_ppoll, pfd, (unsigned long)n, &zero, NULL, 0) < 0)
                        return;
                for (int i = 0; i < n; i++) {
                        if (pfd[i].revents & POLLNVAL)
                                continue;
                        int fd = base + i;
                        long fl = syscall(SYS_fcntl, fd, F_GETFL);
                        if (fl < 0 || (fl & O_PATH) || (fl & O_ACCMODE) == O_RDONLY)
                                continue;
                        struct stat st;
                        if (velo_sys_fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
                                continue; /* pipes, ttys, sockets: never in a tree */
                        struct velo_target t;
                        velo_resolve_fd(fd, &t);
                        if (!t.inside || !t.exists || !S_ISREG(t.st.st_mode))
                                continue;
                        velo_fd_mark(fd);
                        velo_journal_target(VELO_R_INHERIT, VELO_P_EVENT, fd, (uint32_t)fl, &t,
                                            NULL);
                }
        }
}
