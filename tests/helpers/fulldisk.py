"""A small filesystem to fill: a tmpfs mounted in a mount namespace of this process's own (the
caller is a forked child, e.g. `ns.run_in_child`, as root), and a filler that takes its last
byte. Shared by the full-disk tests of the store, the outputs and pull."""

from __future__ import annotations

import os


def private_tmpfs(base: str, size: str) -> str:
    """`base`/mnt as a new tmpfs of `size` (e.g. "3m"), seen by this process only (its own
    mount namespace, private propagation): gone with the process, nothing to unmount."""
    from veloverlay import _libc, mount

    _libc.unshare(_libc.CLONE_NEWNS)
    mount.make_rprivate("/")
    mnt = os.path.join(base, "mnt")
    mount.mount_tmpfs(mnt, f"size={size}")
    return mnt


def fill(path: str) -> int:
    """Write zeros to the new file `path` until its filesystem is full; the errno that stopped
    it (ENOSPC on a full disk)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        return exc.errno or 0
    finally:
        os.close(fd)
