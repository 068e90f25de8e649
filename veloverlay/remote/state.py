"""What a store remembers about remotes, under `<store>/remote-v1/`.

The BLAKE3 -> sha256 map of objects that travelled alone, so a second push needs no re-hash.

`<store>/remote-v1/sha256-v1`: fixed 64-byte records (BLAKE3, sha256), appended under flock by
whoever computed a pair (push while verifying an object, pull while receiving one). A torn last
record (a crash mid-append) is cut off by the next writer. The map is as trusted as the store: a
wrong pair can only make a push name a blob the registry then refuses or a pull rejects.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from veloverlay.store.cas import Store

__all__ = ["ShaMap", "Versions"]

_REC = 64


class ShaMap:
    def __init__(self, store: Store) -> None:
        self.dir = Path(store.root) / "remote-v1"
        self.path = self.dir / "sha256-v1"
        self.map: dict[bytes, bytes] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        for i in range(0, len(data) - len(data) % _REC, _REC):
            self.map[data[i : i + 32]] = data[i + 32 : i + _REC]

    def get(self, blake3: bytes) -> str | None:
        sha = self.map.get(blake3)
        return "sha256:" + sha.hex() if sha is not None else None

    def add(self, pairs: dict[bytes, str]) -> None:
        new = {b: bytes.fromhex(s.split(":", 1)[1]) for b, s in pairs.items()}
        new = {b: s for b, s in new.items() if self.map.get(b) != s}
        if not new:
            return
        self.dir.mkdir(exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size % _REC:
                os.ftruncate(fd, size - size % _REC)
            os.lseek(fd, 0, os.SEEK_END)
            buf = memoryview(b"".join(b + s for b, s in new.items()))
            while buf:
                buf = buf[os.write(fd, buf) :]
        finally:
            os.close(fd)
        self.map.update(new)


class Versions:
    """The last version this store pushed or pulled per (registry, ref): `remote-v1/versions-v1
    .json`, {registry: {ref: [repository, manifest digest]}} (registry: `HOST[:PORT]`, or
    `http://HOST[:PORT]` without TLS). A push to another repository of the same
    registry uses it as a have-list and mounts its blobs instead of uploading them."""

    def __init__(self, store: Store) -> None:
        self.path = Path(store.root) / "remote-v1" / "versions-v1.json"

    def load(self) -> dict[str, dict[str, list[str]]]:
        try:
            data = json.loads(self.path.read_bytes())
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, host: str, ref: str) -> tuple[str, str] | None:
        hit = self.load().get(host, {}).get(ref)
        if isinstance(hit, list) and len(hit) == 2 and all(isinstance(x, str) for x in hit):
            return hit[0], hit[1]
        return None

    def set(self, host: str, ref: str, repo: str, digest: str) -> None:
        self.path.parent.mkdir(exist_ok=True)
        fd = os.open(
            self.path.parent / "versions.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = self.load()
            data.setdefault(host, {})[ref] = [repo, digest]
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, sort_keys=True))
            os.replace(tmp, self.path)
        finally:
            os.close(fd)
