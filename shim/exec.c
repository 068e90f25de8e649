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

/* Open actions after a chdir action (posix_spawn_file_actions_addchdir_np/addfchdir_np) are
 * relative to that directory in the child. Resolved from the parent's cwd, `addchdir("d")` then
 * `addopen(1, "b", O_WRONLY)` broke nothing (or the wrong file) and the child wrote d/b's shared
 * proxy. So each file-actions object with a chdir action has its directory (as the parent
 * resolves it when the action is added) in a small table, claimed by the object's address and
 * freed by posix_spawn_file_actions_init/destroy. No malloc: static slots. An object that finds
 * no free slot has its relative open actions resolved from the cwd, as before. */
#define SPAWN_DIRS 16

static struct {
        const void *actions;
        int known; /* dir holds the directory; 0: it could not be named */
        char dir[PATH_MAX];
} spawn_dirs[SPAWN_DIRS];

static int spawn_slot(const void *actions, int claim)
{
        for (int i = 0; i < SPAWN_DIRS; i++)
                if (__atomic_load_n(&spawn_dirs[i].actions, __ATOMIC_ACQUIRE) == actions)
                        return i;
        for (int i = 0; claim && i < SPAWN_DIRS; i++) {
                const void *none = NULL;
                if (__atomic_compare_exchange_n(&spawn_dirs[i].actions, &none, actions, 0,
                                                __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                        return i;
        }
        return -1;
}

static void spawn_forget(const void *actions)
{
        int i = actions != NULL ? spawn_slot(actions, 0) : -1;
        if (i >= 0)
                __atomic_store_n(&spawn_dirs[i].actions, NULL, __ATOMIC_RELEASE);
}

/* path as the child will see it: joined to the object's chdir directory when relative. */
static const char *spawn_path(const void *actions, const char *path, char full[PATH_MAX])
{
        int i = path[0] != '/' ? spawn_slot(actions, 0) : -1;
        if (i < 0 || !spawn_dirs[i].known)
                return path;
        size_t dl = strlen(spawn_dirs[i].dir), pl = strlen(path);
        if (dl + 1 + pl >= PATH_MAX)
                return path;
        memcpy(full, spawn_dirs[i].dir, dl);
        full[dl] = '/';
        memcpy(full + dl + 1, path, pl + 1);
        return full;
}

static void spawn_chdir(const void *actions, const char *path, int fd)
{
        VELO_SAVE_ERRNO;
        struct velo_target t;
        char full[PATH_MAX];
        if (path != NULL)
                velo_resolve(AT_FDCWD, spawn_path(actions, path, full), VELO_FOLLOW, &t);
        else
                velo_resolve_fd(fd, &t);
        int i = spawn_slot(actions, 1);
        if (i >= 0) {
                spawn_dirs[i].known = t.len > 0 && !t.trunc && t.path[0] == '/';
                memcpy(spawn_dirs[i].dir, t.path, t.len + 1);
        }
        VELO_RESTORE_ERRNO;
}

VELO_EXPORT int posix_spawn_file_actions_addchdir_np(posix_spawn_file_actions_t *actions,
                                                     const char *path)
{
        static void *slot;
        int (*real)(posix_spawn_file_actions_t *, const char *) =
                (int (*)(posix_spawn_file_actions_t *, const char *))velo_sym(
                        &slot, "posix_spawn_file_actions_addchdir_np");
        velo_init();
        if (real == NULL)
                return ENOSYS;
        int rc = real(actions, path);
        if (rc == 0 && velo_active && path != NULL)
                spawn_chdir(actions, path, -1);
        return rc;
}

VELO_EXPORT int posix_spawn_file_actions_addfchdir_np(posix_spawn_file_actions_t *actions, int fd)
{
        static void *slot;
        int (*real)(posix_spawn_file_actions_t *, int) =
                (int (*)(posix_spawn_file_actions_t *, int))velo_sym(
                        &slot, "posix_spawn_file_actions_addfchdir_np");
        velo_init();
        if (real == NULL)
                return ENOSYS;
        int rc = real(actions, fd);
        if (rc == 0 && velo_active)
                spawn_chdir(actions, NULL, fd);
        return rc;
}

VELO_EXPORT int posix_spawn_file_actions_init(posix_spawn_file_actions_t *actions)
{
        static void *slot;
        int (*real)(posix_spawn_file_actions_t *) = (int (*)(posix_spawn_file_actions_t *))
                velo_sym(&slot, "posix_spawn_file_actions_init");
        spawn_forget(actions);
        return real != NULL ? real(actions) : ENOSYS;
}

VELO_EXPORT int posix_spawn_file_actions_destroy(posix_spawn_file_actions_t *actions)
{
        static void *slot;
        int (*real)(posix_spawn_file_actions_t *) = (int (*)(posix_spawn_file_actions_t *))
                velo_sym(&slot, "posix_spawn_file_actions_destroy");
        spawn_forget(actions);
        return real != NULL ? real(actions) : ENOSYS;
}

/* An open action runs in the spawned child through glibc's internal open, before the new image
 * (and its shim) exists: in --link mode a file opened there for writing is broken here, when the
 * action is added (its path as the parent resolves it now, after the object's chdir actions).
 * A store path or an unbreakable proxy is refused. */
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
                char full[PATH_MAX];
                unsigned vf = (oflag & O_NOFOLLOW) ? 0 : VELO_FOLLOW;
                velo_resolve(AT_FDCWD, spawn_path(actions, path, full), vf, &t);
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
