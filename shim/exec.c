/* exec and posix_spawn: how the session learns which programs run without the shim.
 *
 * Before an exec the shim journals EXEC(intent) with the program; the new image, if it loads the
 * shim, checks in under the same pid. An exec that fails comes back here and is journaled as
 * EXEC(done, -errno). So an EXEC intent with neither a later check-in nor a failure from that pid
 * is a program that ran unshimmed: static, setuid (the loader drops LD_PRELOAD), an unreadable
 * library, or an environment that dropped LD_PRELOAD. posix_spawn's child pid is journaled the
 * same way (SPAWN, done). glibc's own execl/execvp/system/popen reach execve internally, not
 * through these symbols, hence one hook per entry point.
 *
 * Written fds marked close-on-exec are closed by a successful exec: journaled here, first.
 */
#include "veloshim.h"

#include <spawn.h>
#include <stdarg.h>
#include <string.h>

extern char **environ;

static void exec_intent(int dirfd, const char *path, int search)
{
        struct velo_target t;
        VELO_SAVE_ERRNO;
        if (search && strchr(path, '/') == NULL) {
                size_t n = strlen(path);
                t.len = n < sizeof t.path - 1 ? n : sizeof t.path - 1;
                memcpy(t.path, path, t.len);
                t.path[t.len] = '\0';
                t.trunc = n != t.len;
                t.inside = t.protect = t.exists = t.unknown = t.proxy = t.broke = 0;
        } else {
                velo_resolve(dirfd, path, VELO_FOLLOW | VELO_EMPTY, &t);
        }
        velo_fd_close_all_marked(1, 1);
        velo_journal_target(VELO_R_EXEC, VELO_P_INTENT, 0, 0, &t, NULL);
        VELO_RESTORE_ERRNO;
}

static void exec_failed(int err)
{
        VELO_SAVE_ERRNO;
        velo_journal(VELO_R_EXEC, VELO_P_DONE, -err, 0, 0, 0, NULL, 0, NULL, 0, 0);
        VELO_RESTORE_ERRNO;
}

VELO_EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
        velo_init();
        if (velo_active && path != NULL)
                exec_intent(AT_FDCWD, path, 0);
        int rc = REAL(execve) != NULL ? REAL(execve)(path, argv, envp)
                                          : (int)syscall(SYS_execve, path, argv, envp);
        if (velo_active)
                exec_failed(errno);
        return rc;
}

VELO_EXPORT int execv(const char *path, char *const argv[])
{
        return execve(path, argv, environ);
}

static int do_execvpe(const char *file, char *const argv[], char *const envp[])
{
        velo_init();
        if (REAL(execvpe) == NULL) {
                errno = ENOSYS;
                return -1;
        }
        if (velo_active && file != NULL)
                exec_intent(AT_FDCWD, file, 1);
        int rc = REAL(execvpe)(file, argv, envp);
        if (velo_active)
                exec_failed(errno);
        return rc;
}

VELO_EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
        return do_execvpe(file, argv, envp);
}

VELO_EXPORT int execvp(const char *file, char *const argv[])
{
        return do_execvpe(file, argv, environ);
}

/* execl*: the variadic list becomes an argv on the stack (no malloc: vfork children call it). */
#define VARARGS_TO_ARGV(arg0, last)                                                                \
        size_t argc = 1;                                                                           \
        va_list ap;                                                                                \
        va_start(ap, last);                                                                        \
        while (va_arg(ap, const char *) != NULL)                                                   \
                argc++;                                                                            \
        va_end(ap);                                                                                \
        char **argv = __builtin_alloca((argc + 1) * sizeof(char *));                              \
        argv[0] = (char *)(arg0);                                                                  \
        va_start(ap, last);                                                                        \
        for (size_t i = 1; i <= argc; i++)                                                         \
                argv[i] = va_arg(ap, char *);

VELO_EXPORT int execl(const char *path, const char *arg, ...)
{
        VARARGS_TO_ARGV(arg, arg);
        va_end(ap);
        return execve(path, argv, environ);
}

VELO_EXPORT int execlp(const char *file, const char *arg, ...)
{
        VARARGS_TO_ARGV(arg, arg);
        va_end(ap);
        return do_execvpe(file, argv, environ);
}

VELO_EXPORT int execle(const char *path, const char *arg, ...)
{
        VARARGS_TO_ARGV(arg, arg);
        char *const *envp = va_arg(ap, char *const *);
        va_end(ap);
        return execve(path, argv, envp);
}

VELO_EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
        velo_init();
        if (REAL(fexecve) == NULL) {
                errno = ENOSYS;
                return -1;
        }
        if (velo_active)
                exec_intent(fd, "", 0);
        int rc = REAL(fexecve)(fd, argv, envp);
        if (velo_active)
                exec_failed(errno);
        return rc;
}

VELO_EXPORT int execveat(int dirfd, const char *path, char *const argv[], char *const envp[],
                         int flags)
{
        velo_init();
        if (velo_active && path != NULL)
                exec_intent(dirfd, path, 0);
        int rc = REAL(execveat) != NULL
                         ? REAL(execveat)(dirfd, path, argv, envp, flags)
                         : (int)syscall(SYS_execveat, dirfd, path, argv, envp, flags);
        if (velo_active)
                exec_failed(errno);
        return rc;
}

typedef int (*spawn_fn)(pid_t *, const char *, const void *, const void *, char *const[],
                        char *const[]);

static int do_spawn(spawn_fn real, pid_t *pid, const char *path, const void *actions,
                    const void *attr, char *const argv[], char *const envp[], int search)
{
        velo_init();
        if (real == NULL)
                return ENOSYS;
        pid_t child = 0;
        int rc = real(&child, path, actions, attr, argv, envp);
        if (pid != NULL)
                *pid = child;
        if (velo_active && rc == 0) {
                VELO_SAVE_ERRNO;
                struct velo_target t;
                if (search && strchr(path, '/') == NULL) {
                        size_t n = strlen(path);
                        t.len = n < sizeof t.path - 1 ? n : sizeof t.path - 1;
                        memcpy(t.path, path, t.len);
                        t.path[t.len] = '\0';
                        t.trunc = n != t.len;
                        t.inside = t.protect = t.exists = t.unknown = t.proxy = t.broke = 0;
                } else {
                        velo_resolve(AT_FDCWD, path, VELO_FOLLOW, &t);
                }
                velo_journal_target(VELO_R_SPAWN, VELO_P_DONE, (int32_t)child, 0, &t, NULL);
                VELO_RESTORE_ERRNO;
        }
        return rc;
}

VELO_EXPORT int posix_spawn(pid_t *pid, const char *path,
                            const posix_spawn_file_actions_t *actions,
                            const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
        velo_init();
        return do_spawn((spawn_fn)REAL(posix_spawn), pid, path, actions, attr, argv, envp, 0);
}

VELO_EXPORT int posix_spawnp(pid_t *pid, const char *file,
                             const posix_spawn_file_actions_t *actions,
                             const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
        velo_init();
        return do_spawn((spawn_fn)REAL(posix_spawnp), pid, file, actions, attr, argv, envp, 1);
}

/* An open action runs in the spawned child through glibc's internal open, before the new image
 * (and its shim) exists: in --link mode a file opened there for writing is broken here, when the
 * action is added (its path as the parent resolves it now; a relative path after an addchdir
 * action is resolved from the parent's cwd). A store path or an unbreakable proxy is refused. */
VELO_EXPORT int posix_spawn_file_actions_addopen(posix_spawn_file_actions_t *actions, int fd,
                                                 const char *path, int oflag, mode_t mode)
{
        velo_init();
        if (REAL(posix_spawn_file_actions_addopen) == NULL)
                return ENOSYS;
        int writes = (oflag & O_ACCMODE) != O_RDONLY || (oflag & (O_TRUNC | O_CREAT));
        if (velo_active && path != NULL && writes && !(oflag & O_PATH)) {
                VELO_SAVE_ERRNO;
                struct velo_target t;
                unsigned vf = (oflag & O_NOFOLLOW) ? 0 : VELO_FOLLOW;
                velo_resolve(AT_FDCWD, path, vf, &t);
                int err = 0;
                if (t.protect || (t.proxy && (!t.inside || t.unknown || t.trunc)))
                        err = EROFS;
                else if (t.inside && t.proxy && velo_bbw(&t) < 0)
                        err = errno;
                if (err != 0) {
                        velo_journal_target(VELO_R_DENIED, VELO_P_EVENT, -err, VELO_R_OPEN, &t,
                                            NULL);
                        VELO_RESTORE_ERRNO;
                        return err;
                }
                VELO_RESTORE_ERRNO;
        }
        return REAL(posix_spawn_file_actions_addopen)(actions, fd, path, oflag, mode);
}
