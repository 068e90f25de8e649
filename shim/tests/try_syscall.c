/* try_syscall: run one intercepted call per argument group and print "<op> <ret> <errno>".
 *
 *   try_syscall OP ARGS... [-- OP ARGS...]...
 *
 * Run under LD_PRELOAD=libveloshim.so by tests/shim/test_c_shim.py, which then reads the journal
 * and checks what the shim recorded for each call (bubblewrap's tests/try-syscall.c idea). Ops
 * that bypass the shim on purpose (raw_write, static builds) serve the hostile-writer tests.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

extern char **environ;

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0)
#endif
#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

static void report(const char *op, long ret)
{
        printf("%s %ld %d\n", op, ret, ret < 0 ? errno : 0);
        fflush(stdout);
}

/* libc's own syscall(): the shim hooks the one programs reach through the PLT, so the raw ops
 * (what a static binary or a Go program does) take the definition in libc.so.6 itself. */
static long raw_syscall(long n, long a, long b, long c, long d)
{
        static long (*fn)(long, ...);
        if (fn == NULL) {
                void *libc = dlopen("libc.so.6", RTLD_NOW | RTLD_NOLOAD);
                fn = libc != NULL ? (long (*)(long, ...))dlsym(libc, "syscall") : NULL;
        }
        if (fn == NULL) {
                fprintf(stderr, "no libc syscall\n");
                exit(2);
        }
        return fn(n, a, b, c, d);
}
#define RAW(n, a, b, c, d) raw_syscall(n, (long)(a), (long)(b), (long)(c), (long)(d))

static int write_str(int fd, const char *s)
{
        return (int)write(fd, s, strlen(s));
}

/* Runs op at argv[0] with its arguments; returns how many words it used. */
static int run(char **argv, char *self)
{
        const char *op = argv[0];
        const char *a = argv[1], *b = argv[1] ? argv[2] : NULL;
        long r = 0;
        int used = 2;
        if (!strcmp(op, "open_w")) {
                int fd = open(a, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                r = fd < 0 ? -1 : write_str(fd, "open_w\n");
                if (fd >= 0)
                        close(fd);
        } else if (!strcmp(op, "open_append")) {
                int fd = open(a, O_WRONLY | O_APPEND | O_CLOEXEC);
                r = fd < 0 ? -1 : write_str(fd, "appended\n");
                if (fd >= 0)
                        close(fd);
        } else if (!strcmp(op, "open_r")) {
                int fd = open(a, O_RDONLY | O_CLOEXEC);
                r = fd;
                if (fd >= 0)
                        close(fd);
        } else if (!strcmp(op, "openat_w")) {
                int dfd = open(a, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                int fd = openat(dfd, b, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
                r = fd < 0 ? -1 : write_str(fd, "openat\n");
                if (fd >= 0)
                        close(fd);
                close(dfd);
                used = 3;
        } else if (!strcmp(op, "creat")) {
                int fd = creat(a, 0640);
                r = fd < 0 ? -1 : write_str(fd, "creat\n");
                if (fd >= 0)
                        close(fd);
        } else if (!strcmp(op, "fopen_w") || !strcmp(op, "fopen_a") || !strcmp(op, "fopen_r")) {
                FILE *f = fopen(a, op[6] == 'w' ? "w" : op[6] == 'a' ? "a" : "r");
                r = f == NULL ? -1 : 0;
                if (f != NULL) {
                        if (op[6] != 'r')
                                fputs("fopen\n", f);
                        fclose(f);
                }
        } else if (!strcmp(op, "freopen")) {
                FILE *f = freopen(a, "w", stdin);
                r = f == NULL ? -1 : fputs("freopen\n", f);
                if (f != NULL)
                        fclose(f);
        } else if (!strcmp(op, "freopen_null")) {
                /* a read stream reopened for appending: glibc reopens its own /proc/self/fd */
                FILE *f = fopen(a, "r");
                f = f == NULL ? NULL : freopen(NULL, "a", f);
                r = f == NULL ? -1 : fputs("freopen\n", f);
                if (f != NULL)
                        fclose(f);
        } else if (!strcmp(op, "link_empty")) {
                /* a hard link made from a read-only fd (AT_EMPTY_PATH) */
                int fd = open(a, O_RDONLY | O_CLOEXEC);
                r = linkat(fd, "", AT_FDCWD, b, AT_EMPTY_PATH);
                close(fd);
                used = 3;
        } else if (!strcmp(op, "truncate")) {
                r = truncate(a, 1);
        } else if (!strcmp(op, "ftruncate")) {
                int fd = open(a, O_RDWR | O_CLOEXEC);
                r = ftruncate(fd, 2);
                close(fd);
        } else if (!strcmp(op, "rename")) {
                r = rename(a, b);
                used = 3;
        } else if (!strcmp(op, "renameat2")) {
                r = renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_NOREPLACE);
                used = 3;
        } else if (!strcmp(op, "exchange")) {
                r = renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE);
                used = 3;
        } else if (!strcmp(op, "unlink")) {
                r = unlink(a);
        } else if (!strcmp(op, "rmdir")) {
                r = rmdir(a);
        } else if (!strcmp(op, "mkdir")) {
                r = mkdir(a, 0750);
        } else if (!strcmp(op, "mkfifo")) {
                r = mkfifo(a, 0640);
        } else if (!strcmp(op, "mknod")) {
                r = mknod(a, S_IFREG | 0640, 0);
        } else if (!strcmp(op, "mkdtemp")) {
                char tmpl[4096];
                snprintf(tmpl, sizeof tmpl, "%s", a);
                r = mkdtemp(tmpl) == NULL ? -1 : 0;
                printf("mkdtemp-made %s\n", tmpl);
        } else if (!strcmp(op, "link")) {
                r = link(a, b);
                used = 3;
        } else if (!strcmp(op, "symlink")) {
                r = symlink(a, b);
                used = 3;
        } else if (!strcmp(op, "chmod")) {
                r = chmod(a, 0600);
        } else if (!strcmp(op, "fchmod")) {
                int fd = open(a, O_RDONLY | O_CLOEXEC);
                r = fchmod(fd, 0640);
                close(fd);
        } else if (!strcmp(op, "unlink_fchmod")) {
                int fd = open(a, O_RDONLY | O_CLOEXEC);
                unlink(a);
                r = fchmod(fd, 0640);
                close(fd);
        } else if (!strcmp(op, "lchmod")) {
                r = lchmod(a, 0600);
        } else if (!strcmp(op, "fchmodat_empty")) {
                /* glibc >= 2.39 passes AT_EMPTY_PATH on (fchmodat2); 2.36 says EINVAL */
                int fd = open(a, O_RDONLY | O_CLOEXEC);
                r = fchmodat(fd, "", 0600, AT_EMPTY_PATH);
                close(fd);
        } else if (!strcmp(op, "remove")) {
                r = remove(a);
        } else if (!strcmp(op, "xmknod")) {
                /* the pre-2.33 entry point old binaries still call (a compat symbol) */
                int (*xmknod)(int, const char *, mode_t, dev_t *) =
                        (int (*)(int, const char *, mode_t, dev_t *))dlsym(RTLD_DEFAULT, "__xmknod");
                dev_t dev = 0;
                r = xmknod == NULL ? -2 : xmknod(0, a, S_IFIFO | 0640, &dev);
        } else if (!strcmp(op, "rawclone_w")) {
                /* a child made by clone(2) without glibc's fork (no atfork handlers ran) */
                long pid = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
                if (pid == 0) {
                        int fd = open(a, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                        int ok = fd >= 0 && write_str(fd, "clone\n") == 6 && close(fd) == 0;
                        syscall(SYS_exit_group, ok ? 0 : 1);
                }
                int st = 0;
                r = pid < 0 ? -1 : waitpid((pid_t)pid, &st, 0) < 0 ? -1 : WEXITSTATUS(st);
        } else if (!strcmp(op, "exhaust") || !strcmp(op, "exhaust_but")) {
                /* the ops after this one run with no fd free (soft RLIMIT_NOFILE 64) */
                struct rlimit rl;
                getrlimit(RLIMIT_NOFILE, &rl);
                rl.rlim_cur = 64;
                setrlimit(RLIMIT_NOFILE, &rl);
                int last = -1, fd;
                while ((fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0) {
                        last = fd;
                        r++;
                }
                if (!strcmp(op, "exhaust_but")) /* leave the last N fds free */
                        for (int k = atoi(a); k > 0 && last >= 0; k--)
                                close(last--);
                else
                        used = 1;
        } else if (!strcmp(op, "handle_append")) {
                /* open by file handle (needs CAP_DAC_READ_SEARCH): no path in the open */
                union {
                        struct file_handle fh;
                        char buf[sizeof(struct file_handle) + MAX_HANDLE_SZ];
                } h;
                int mnt = 0;
                h.fh.handle_bytes = MAX_HANDLE_SZ;
                int dfd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                r = name_to_handle_at(AT_FDCWD, a, &h.fh, &mnt, 0);
                if (r == 0) {
                        int fd = open_by_handle_at(dfd, &h.fh, O_WRONLY | O_APPEND | O_CLOEXEC);
                        r = fd < 0 ? -1 : write_str(fd, "by handle\n");
                        if (fd >= 0)
                                close(fd);
                }
                close(dfd);
        } else if (!strcmp(op, "chown")) {
                r = chown(a, getuid(), getgid());
        } else if (!strcmp(op, "utime")) {
                struct timeval tv[2] = {{1000, 0}, {2000, 0}};
                r = utimes(a, tv);
        } else if (!strcmp(op, "futimens")) {
                int fd = open(a, O_RDONLY | O_CLOEXEC);
                struct timespec ts[2] = {{3000, 0}, {4000, 5}};
                r = futimens(fd, ts);
                close(fd);
        } else if (!strcmp(op, "utime_empty")) {
                /* the times of the file a read-only fd holds (AT_EMPTY_PATH, kernel >= 5.8) */
                int fd = open(a, O_RDONLY | O_CLOEXEC);
                struct timespec ts[2] = {{5000, 0}, {6000, 0}};
                r = utimensat(fd, "", ts, AT_EMPTY_PATH);
                close(fd);
        } else if (!strcmp(op, "setxattr")) {
                r = setxattr(a, "user.velo", "1", 1, 0);
        } else if (!strcmp(op, "dup2close")) {
                int fd = open(a, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
                int d = dup2(fd, 40);
                close(fd);
                r = write_str(d, "dup2\n");
                close(d);
        } else if (!strcmp(op, "dup3over")) {
                /* dup3 onto a written fd closes it: the shim must journal that close */
                int fd = open(a, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
                int other = open("/dev/null", O_RDONLY | O_CLOEXEC);
                write_str(fd, "dup3\n");
                r = dup3(other, fd, O_CLOEXEC);
                close(fd);
                close(other);
        } else if (!strcmp(op, "fcntl_dup")) {
                int fd = open(a, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
                int d = fcntl(fd, F_DUPFD_CLOEXEC, 50);
                close(fd);
                r = write_str(d, "fcntl\n");
                close(d);
        } else if (!strcmp(op, "close_range")) {
                int fd = open(a, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
                int d = dup2(fd, 60);
                close(fd);
                write_str(d, "close_range\n");
                r = RAW(SYS_close_range, 1000, 1001, 0, 0); /* raw: nothing of ours */
                r = close_range(60, 60, 0);
        } else if (!strcmp(op, "mkstemp")) {
                char tmpl[4096];
                snprintf(tmpl, sizeof tmpl, "%s/tmp.XXXXXX", a);
                int fd = mkstemp(tmpl);
                r = fd < 0 ? -1 : write_str(fd, "mkstemp\n");
                if (fd >= 0)
                        close(fd);
                if (fd >= 0)
                        printf("mkstemp-name %s\n", tmpl);
        } else if (!strcmp(op, "fork_exec")) {
                /* child: exec ourselves with the next op group, check in under its pid */
                pid_t pid = fork();
                if (pid == 0) {
                        char *args[] = {self, "open_w", (char *)b, NULL};
                        execv(a, args);
                        _exit(127);
                }
                int st = 0;
                waitpid(pid, &st, 0);
                r = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
                used = 3;
        } else if (!strcmp(op, "spawn")) {
                pid_t pid;
                char *args[] = {(char *)a, NULL};
                r = posix_spawn(&pid, a, NULL, NULL, args, environ);
                int st = 0;
                if (r == 0)
                        waitpid(pid, &st, 0);
                printf("spawn-pid %d\n", (int)pid);
        } else if (!strcmp(op, "exec_missing")) {
                char *args[] = {(char *)a, NULL};
                r = execv(a, args);
        } else if (!strcmp(op, "inherit")) {
                /* an fd open for writing survives exec: the new image must adopt it */
                int fd = open(a, O_WRONLY | O_CREAT | O_APPEND, 0644);
                if (fd != 3) {
                        dup2(fd, 3);
                        close(fd);
                }
                char *args[] = {self, "write_fd3", NULL};
                execv(self, args);
                r = -1;
        } else if (!strcmp(op, "write_fd3")) {
                r = write_str(3, "inherited\n");
                used = 1;
        } else if (!strcmp(op, "raw_write")) {
                /* bypasses every hook: what a static binary or a Go program does */
                int fd = (int)RAW(SYS_openat, AT_FDCWD, a, O_WRONLY | O_TRUNC | O_CLOEXEC, 0);
                r = fd < 0 ? -1 : RAW(SYS_write, fd, "raw\n", 4, 0);
                if (fd >= 0)
                        RAW(SYS_close, fd, 0, 0, 0);
        } else if (!strcmp(op, "raw_chmod_write")) {
                RAW(SYS_fchmodat, AT_FDCWD, a, 0644, 0);
                int fd = (int)RAW(SYS_openat, AT_FDCWD, a, O_WRONLY | O_TRUNC | O_CLOEXEC, 0);
                r = fd < 0 ? -1 : RAW(SYS_write, fd, "hostile\n", 8, 0);
                if (fd >= 0)
                        RAW(SYS_close, fd, 0, 0, 0);
        } else {
                fprintf(stderr, "unknown op %s\n", op);
                exit(2);
        }
        report(op, r);
        return used;
}

int main(int argc, char **argv)
{
        int i = 1;
        while (i < argc) {
                if (!strcmp(argv[i], "--")) {
                        i++;
                        continue;
                }
                i += run(argv + i, argv[0]);
        }
        return 0;
}
