/* On-disk formats shared by the shim (C) and veloverlay/shim.py (Python). Little endian.
 *
 * 1. The session export ("shim.conf"), written once by the session manager before the command
 *    starts, read-only for the shim, named by $VELO_SHIM_CONFIG:
 *
 *        struct velo_conf_hdr   (80 bytes)
 *        strings                 NUL-terminated, at the offsets the header names
 *        struct velo_proxy[n]    sorted by (dev, ino), 8-byte aligned, at proxies_off
 *
 * 2. The journal ("journal"), created by the manager with a velo_journal_hdr; every shimmed
 *    process appends records with ONE write(2) under O_APPEND, each at most VELO_REC_MAX bytes
 *    (<= PIPE_BUF), so records from concurrent writers never interleave. A record whose path did
 *    not fit is cut and flagged (VELO_F_TRUNC1/2): the daemon then re-scans the directory named by
 *    the part that is there.
 *
 * Both carry magic + version + reserved fields; a reader refuses an unknown major version.
 * Bump VELO_*_VERSION by adding (new record types, new header fields taken from reserved).
 */
#ifndef VELO_FORMAT_H
#define VELO_FORMAT_H

#include <stdint.h>

#define VELO_CONF_MAGIC "VELOSHC\0"
#define VELO_CONF_VERSION 1u
#define VELO_CONF_F_LINK 0x1u /* --link: Break-Before-Write on proxy inodes */

struct velo_conf_hdr {
        char magic[8];
        uint32_t version;
        uint32_t header_size;
        uint32_t flags;
        uint32_t n_proxies;
        uint64_t root_dev; /* the projection's directory */
        uint64_t root_ino;
        uint32_t root_off; /* canonical path of the projection (no trailing slash) */
        uint32_t journal_off;
        uint32_t sock_off;    /* unix socket of the daemon ("" = none, "@name" = abstract) */
        uint32_t locks_off;   /* directory for per-path Break-Before-Write lock files */
        uint32_t protect_off; /* ':'-separated canonical prefixes no shimmed write may touch */
        uint32_t proxies_off;
        uint32_t reserved[4];
};

struct velo_proxy {
        uint64_t dev;
        uint64_t ino;
};

#define VELO_JOURNAL_MAGIC "VELOJNL\0"
#define VELO_JOURNAL_VERSION 1u

struct velo_journal_hdr {
        char magic[8];
        uint32_t version;
        uint32_t header_size; /* records start here */
        uint64_t created_ns;
        char session[32]; /* session id, NUL padded */
        uint32_t reserved[2];
};

#define VELO_REC_MAGIC 0x31524A56u /* "VJR1" read as bytes */
#define VELO_REC_MAX 4096u

enum velo_rec_type {
        VELO_R_CHECKIN = 1,  /* a shimmed process started: path1 = exe, arg = ppid */
        VELO_R_OPEN = 2,     /* open for writing/creating: arg = open flags */
        VELO_R_CLOSE = 3,    /* a written fd was closed (or is closed by exec: arg = 1) */
        VELO_R_TRUNCATE = 4, /* truncate/ftruncate */
        VELO_R_RENAME = 5,   /* path1 -> path2, arg = renameat2 flags */
        VELO_R_UNLINK = 6,
        VELO_R_LINK = 7,    /* path1 (existing) -> path2 (new name) */
        VELO_R_SYMLINK = 8, /* path1 = the new link, path2 = its target text */
        VELO_R_MKDIR = 9,
        VELO_R_RMDIR = 10,
        VELO_R_CHMOD = 11,
        VELO_R_CHOWN = 12,
        VELO_R_XATTR = 13,
        VELO_R_UTIME = 14,
        VELO_R_BBW = 15,     /* Break-Before-Write replaced a proxy link by a private copy */
        VELO_R_EXEC = 16,    /* intent: path1 = program; done: it failed (ret = -errno) */
        VELO_R_SPAWN = 17,   /* posix_spawn done: ret = child pid, path1 = program */
        VELO_R_INHERIT = 18, /* at start: an inherited fd open for writing, path1 = its file */
        VELO_R_DENIED = 19,  /* a write into the store was refused (EROFS) */
        VELO_R_MKNOD = 20,   /* mknod/mkfifo: arg = mode with its file type bits */
};

enum velo_rec_phase {
        VELO_P_EVENT = 0,
        VELO_P_INTENT = 1,
        VELO_P_DONE = 2,
};

#define VELO_F_TRUNC1 0x1u /* path1 was cut to fit the record */
#define VELO_F_TRUNC2 0x2u
#define VELO_F_NOPATH 0x4u /* the path could not be resolved (e.g. fd of a deleted file) */

struct velo_rec {
        uint32_t magic;
        uint16_t size; /* whole record, header + paths */
        uint8_t type;
        uint8_t phase;
        uint32_t flags;
        int32_t pid;
        int32_t ret; /* DONE: result, or -errno */
        uint32_t arg;
        uint64_t dev; /* identity of the target, when known */
        uint64_t ino;
        uint64_t time_ns; /* CLOCK_REALTIME */
        uint16_t len1;
        uint16_t len2;
        uint32_t reserved;
        /* char path1[len1]; char path2[len2]; (no NULs) */
};

_Static_assert(sizeof(struct velo_conf_hdr) == 80, "conf header layout");
_Static_assert(sizeof(struct velo_journal_hdr) == 64, "journal header layout");
_Static_assert(sizeof(struct velo_rec) == 56, "record header layout");

#endif
