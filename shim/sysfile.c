/* glibc functions that open a file the program names with glibc's internal open or fopen, past
 * the hooks of open.c: setmntent/endmntent (a mount table, any fopen mode: addmntent appends),
 * updwtmp(x) (appends a login record) and utmpname/utmpxname (getutent, pututline... open that
 * file O_RDWR on their first use).
 *
 * Found by attack: in --link mode `updwtmp("f", &ut)`, `setmntent("f", "a")` + `addmntent` and
 * `utmpname("f")` + `pututline` wrote into the shared proxy of f (every tree with that content
 * changed; fsck's verify_proxies reported it corrupt), and nothing was journaled.
 *
 * Each is treated as the open glibc makes: refused in the store, Break-Before-Write, journaled.
 * utmpname is not refused in the store: its file is opened O_RDWR only when it can be (glibc
 * falls back to reading; the store's objects are 0444, root's immutable), and `who FILE`,
 * `last -f FILE` read a Tier-1 file of the tree that way.
 */
#include "veloshim.h"

#include <mntent.h>
#include <utmp.h>
#include <utmpx.h>

static FILE *do_setmntent(void **slot, const char *name, const char *file, const char *mode)
{
        return velo_fopen((FILE * (*)(const char *, const char *)) velo_sym(slot, name), file,
                          mode);
}

VELO_EXPORT FILE *setmntent(const char *file, const char *mode)
{
        static void *slot;
        return do_setmntent(&slot, "setmntent", file, mode);
}

/* glibc's exported aliases (other symbols, the same functions) */
VELO_EXPORT FILE *__setmntent(const char *file, const char *mode);
VELO_EXPORT FILE *__setmntent(const char *file, const char *mode)
{
        static void *slot;
        return do_setmntent(&slot, "__setmntent", file, mode);
}

VELO_EXPORT int endmntent(FILE *stream)
{
        static void *slot;
        return velo_fclose((int (*)(FILE *))velo_sym(&slot, "endmntent"), stream);
}

VELO_EXPORT int __endmntent(FILE *stream);
VELO_EXPORT int __endmntent(FILE *stream)
{
        static void *slot;
        return velo_fclose((int (*)(FILE *))velo_sym(&slot, "__endmntent"), stream);
}

/* A file glibc will open with `flags` later in this call (updwtmp) or by a later call (utmp). */
static int pre_open(const char *file, int flags, unsigned vf, struct velo_target *t,
                    const char **use)
{
        int r = velo_pre1(VELO_R_OPEN, (uint32_t)flags, AT_FDCWD, file, vf, t);
        int cwd = AT_FDCWD;
        if (r == VELO_TRACK)
                *use = velo_redirect(t, &cwd, file);
        return r;
}

static void do_updwtmp(void (*real)(const char *, const void *), const char *file,
                       const void *ut)
{
        if (real == NULL)
                return;
        struct velo_target t;
        const char *use = file;
        int r = pre_open(file, O_WRONLY, VELO_FOLLOW | VELO_WRITE | VELO_BBW, &t, &use);
        if (r == VELO_DENY)
                return; /* updwtmp says nothing of a failure either; errno is EROFS */
        real(use, ut);
        if (r == VELO_TRACK)
                velo_post(VELO_R_OPEN, O_WRONLY, &t, NULL, 0, errno);
}

VELO_EXPORT void updwtmp(const char *file, const struct utmp *ut)
{
        static void *slot;
        do_updwtmp((void (*)(const char *, const void *))velo_sym(&slot, "updwtmp"), file, ut);
}

VELO_EXPORT void updwtmpx(const char *file, const struct utmpx *ut)
{
        static void *slot;
        do_updwtmp((void (*)(const char *, const void *))velo_sym(&slot, "updwtmpx"), file, ut);
}

static int do_utmpname(int (*real)(const char *), const char *file)
{
        if (real == NULL) {
                errno = ENOSYS;
                return -1;
        }
        struct velo_target t;
        const char *use = file;
        int r = pre_open(file, O_RDWR, VELO_FOLLOW | VELO_BBW, &t, &use);
        if (r == VELO_DENY)
                return -1;
        int rc = real(use); /* glibc keeps a copy of the name */
        if (r == VELO_TRACK)
                velo_post(VELO_R_OPEN, O_RDWR, &t, NULL, rc, errno);
        return rc;
}

VELO_EXPORT int utmpname(const char *file)
{
        static void *slot;
        return do_utmpname((int (*)(const char *))velo_sym(&slot, "utmpname"), file);
}

VELO_EXPORT int utmpxname(const char *file)
{
        static void *slot;
        return do_utmpname((int (*)(const char *))velo_sym(&slot, "utmpxname"), file);
}
