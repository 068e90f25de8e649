/* The journal and the live check-in.
 *
 * One record = one write(2) of at most VELO_REC_MAX (= PIPE_BUF) bytes to a file opened with
 * O_APPEND for that record alone: appends from any number of processes and threads never
 * interleave, and no fd of ours stays open for a program to close, dup over or inherit. The cost
 * (open, write, close) is paid only by calls that change the projection, never by reads.
 *
 * The check-in over the daemon's unix socket is non-blocking end to end: connect and send with
 * SOCK_NONBLOCK/MSG_DONTWAIT, any failure ignored. The journal record is what counts; the socket
 * only lets the daemon see a process (with the kernel's SO_PEERCRED pid) while it runs.
 */
#include "veloshim.h"

#include <string.h>
#include <sys/socket.h>
#include <sys/auxv.h>
#include <sys/un.h>
#include <time.h>

void velo_journal(int type, int phase, int32_t ret, uint32_t arg, uint64_t dev, uint64_t ino,
                  const char *p1, size_t l1, const char *p2, size_t l2, uint32_t flags)
{
        union {
                struct velo_rec r;
                char bytes[VELO_REC_MAX];
        } buf;
        struct velo_rec *r = &buf.r;
        size_t room = VELO_REC_MAX - sizeof *r;
        if (l1 > room) {
                l1 = room;
                flags |= VELO_F_TRUNC1;
        }
        if (l2 > room - l1) {
                l2 = room - l1;
                flags |= VELO_F_TRUNC2;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts); /* vDSO: no syscall */
        memset(r, 0, sizeof *r);
        r->magic = VELO_REC_MAGIC;
        r->size = (uint16_t)(sizeof *r + l1 + l2);
        r->type = (uint8_t)type;
        r->phase = (uint8_t)phase;
        r->flags = flags;
        r->pid = (int32_t)velo_sys_getpid();
        r->ret = ret;
        r->arg = arg;
        r->dev = dev;
        r->ino = ino;
        r->time_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
        r->len1 = (uint16_t)l1;
        r->len2 = (uint16_t)l2;
        if (l1)
                memcpy(buf.bytes + sizeof *r, p1, l1);
        if (l2)
                memcpy(buf.bytes + sizeof *r + l1, p2, l2);
        int fd = velo_sys_openat(AT_FDCWD, velo_conf_journal(),
                                 O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0);
        if (fd < 0)
                return;
        TEMP_FAILURE_RETRY(syscall(SYS_write, fd, buf.bytes, r->size));
        velo_sys_close(fd);
}

void velo_journal_target(int type, int phase, int32_t ret, uint32_t arg,
                         const struct velo_target *t1, const struct velo_target *t2)
{
        uint32_t flags = 0;
        if (t1->trunc)
                flags |= VELO_F_TRUNC1;
        if (t2 != NULL && t2->trunc)
                flags |= VELO_F_TRUNC2;
        if (t1->unknown && t1->len == 0)
                flags |= VELO_F_NOPATH;
        uint64_t dev = t1->exists ? (uint64_t)t1->st.st_dev : 0;
        uint64_t ino = t1->exists ? (uint64_t)t1->st.st_ino : 0;
        velo_journal(type, phase, ret, arg, dev, ino, t1->path, t1->len,
                     t2 != NULL ? t2->path : NULL, t2 != NULL ? t2->len : 0, flags);
}

/* Frame sent to the daemon: "VCK1", version, pid, ppid, exe length, exe. At most 4 KiB. */
struct velo_checkin_frame {
        uint32_t magic;
        uint32_t version;
        int32_t pid;
        int32_t ppid;
        uint32_t exe_len;
        uint32_t reserved;
};

static int live_sent; /* this process has checked in on the socket (reset in a fork child) */

void velo_checkin_reset(void)
{
        __atomic_store_n(&live_sent, 0, __ATOMIC_RELAXED);
}

void velo_checkin(void)
{
        /* the name exec was given (from the aux vector: no syscall; the daemon only reports it) */
        const char *exe = (const char *)getauxval(AT_EXECFN);
        size_t n = exe != NULL ? strlen(exe) : 0;
        uint32_t ppid = (uint32_t)syscall(SYS_getppid);
        velo_journal(VELO_R_CHECKIN, VELO_P_EVENT, 0, ppid, 0, 0, exe, n, NULL, 0, 0);
}

/* The live check-in, sent once per process before its first journaled change (a process that
 * only reads costs the daemon nothing and itself no socket round: start-up cost is paid by every
 * exec'd program). Never blocks, failures ignored. */
void velo_checkin_live(void)
{
        if (__atomic_load_n(&live_sent, __ATOMIC_RELAXED) || velo_in_vfork_child() ||
            __atomic_exchange_n(&live_sent, 1, __ATOMIC_RELAXED))
                return; /* (a vfork child would mark its parent as checked in) */
        char exe[PATH_MAX];
        ssize_t n = (ssize_t)syscall(SYS_readlinkat, AT_FDCWD, "/proc/self/exe", exe,
                                     sizeof exe - 1);
        if (n < 0)
                n = 0;
        uint32_t ppid = (uint32_t)syscall(SYS_getppid);

        const char *sock = velo_conf_sock();
        size_t slen = strlen(sock);
        struct sockaddr_un sa;
        if (slen == 0 || slen >= sizeof sa.sun_path)
                return;
        memset(&sa, 0, sizeof sa);
        sa.sun_family = AF_UNIX;
        memcpy(sa.sun_path, sock, slen);
        socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + slen);
        if (sock[0] == '@')
                sa.sun_path[0] = '\0'; /* abstract name */
        else
                salen += 1;
        int fd = (int)syscall(SYS_socket, AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return;
        if (syscall(SYS_connect, fd, &sa, salen) == 0) {
                union {
                        struct velo_checkin_frame f;
                        char bytes[sizeof(struct velo_checkin_frame) + PATH_MAX];
                } frame;
                size_t elen = (size_t)n;
                if (sizeof frame.f + elen > 4096)
                        elen = 4096 - sizeof frame.f;
                frame.f.magic = 0x314B4356u; /* "VCK1" */
                frame.f.version = 1;
                frame.f.pid = (int32_t)velo_sys_getpid();
                frame.f.ppid = (int32_t)ppid;
                frame.f.exe_len = (uint32_t)elen;
                frame.f.reserved = 0;
                memcpy(frame.bytes + sizeof frame.f, exe, elen);
                syscall(SYS_sendto, fd, frame.bytes, sizeof frame.f + elen,
                        MSG_DONTWAIT | MSG_NOSIGNAL, NULL, 0);
        }
        velo_sys_close(fd);
}
