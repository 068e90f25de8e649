"""The sampled verify a session runs at its start where objects are not immutable (P0-a).

Root-free (and as root where `chattr +i` is refused), the owner of a store can `chmod` a 0444
object and change it outside any session; inside a session the store is read-only, and `fsck`
re-hashes everything, but between the two nothing would notice. So a session that cannot rely
on +i re-hashes a few objects drawn at random from the whole store (a random fan-out directory,
then a random object in it: a store of a few objects is covered whole) and says what it found
(P0-d: a problem is said, never silent). It is a sample, bounded in cost (at most `COUNT`
objects of at most `MAX_SIZE` bytes: about a millisecond), not a proof: `fsck` is.
"""

from __future__ import annotations

import os
import random
import stat

from veloverlay.store.cas import Store
from veloverlay.store.digest import hash_fd

__all__ = ["COUNT", "MAX_SIZE", "verify_sample"]

COUNT = 4
MAX_SIZE = 256 << 10
_HEX = frozenset(b"0123456789abcdef")


def verify_sample(store: Store, count: int = COUNT, rng: random.Random | None = None) -> list[str]:
    """Re-hash up to `count` objects of `store` drawn at random (at most `MAX_SIZE` bytes each,
    larger ones are passed over); returns one warning per object that is not what its name says
    or that its owner made writable. Unreadable directories and objects gone meanwhile (gc) are
    passed over: this is a sample, never an error."""
    rng = rng or random.Random()
    top = os.fsencode(store.objects)
    depth = 1 if store.fanout == 1 else 2
    found: list[str] = []
    seen: set[bytes] = set()
    for _ in range(count):
        path = _draw(top, depth, rng)
        if path is None or path in seen:
            continue
        seen.add(path)
        why = _check(path)
        if why:
            name = os.path.basename(path).decode()
            found.append(
                f"store object {name[:16]} {why} (a sampled check at session start; the store "
                "is not immutable here): run 'veloverlay fsck' to see what else is affected"
            )
    return found


def _draw(top: bytes, depth: int, rng: random.Random) -> bytes | None:
    """A random object path below `top` through `depth` fan-out levels, or None."""
    here = top
    for _ in range(depth):
        try:
            subs = [n for n in os.listdir(here) if len(n) == 2 and set(n) <= _HEX]
        except OSError:
            return None
        if not subs:
            return None
        here = here + b"/" + rng.choice(subs)
    try:
        names = [n for n in os.listdir(here) if len(n) == 64]
    except OSError:
        return None
    return here + b"/" + rng.choice(names) if names else None


def _check(path: bytes) -> str:
    """Why the object at `path` is not what its name says ("" when it is)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""  # gone (gc), or not ours to read: fsck's business
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_mode & 0o222:
            return f"is writable (mode {stat.S_IMODE(st.st_mode):04o})"
        if st.st_size > MAX_SIZE:
            return ""
        digest, _size = hash_fd(fd)
    finally:
        os.close(fd)
    if digest.hex().encode() != os.path.basename(path):
        return f"does not hash to its name (its bytes hash to {digest.hex()[:16]})"
    return ""
