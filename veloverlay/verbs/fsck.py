"""fsck: re-hash every object against its name; check that every manifest reference resolves.

Hashing runs in forked worker processes (it is CPU-bound; 2 cores hash twice as fast). A finding
names its culprit: the object (digest and path) or the ref/commit/node and path that is broken.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat

from veloverlay import paths
from veloverlay.errors import VeloError
from veloverlay.progress import Progress
from veloverlay.records import Record, field
from veloverlay.store.cas import OBJECTS_V1, OBJECTS_V2, Store
from veloverlay.store.digest import hash_fd
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Kind
from veloverlay.workers import Workers, default_jobs

__all__ = ["Finding", "FsckReport", "fsck"]

_HEX = re.compile(r"^[0-9a-f]{64}$")


class Finding(Record, frozen=True):
    kind: str  # object-corrupt, object-misplaced, object-missing, node-corrupt, commit-missing, ...
    what: str
    detail: str


class FsckReport(Record):
    objects: int = 0
    nodes: int = 0
    refs: int = 0
    commits: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "objects": self.objects,
            "nodes": self.nodes,
            "refs": self.refs,
            "commits": self.commits,
            "findings": [
                {"kind": f.kind, "what": f.what, "detail": f.detail} for f in self.findings
            ],
        }


def _check_object(item: tuple[str, str]) -> tuple[str, str, str] | None:
    name, path = item
    if not _HEX.match(name):
        return ("object-stray", path, "not an object name")
    parts = path.rsplit("/", 3)
    one_level = parts[-3] == OBJECTS_V2 and parts[-2] == name[:2]
    two_levels = (
        parts[0].endswith("/" + OBJECTS_V1) and parts[-3] == name[:2] and parts[-2] == name[2:4]
    )
    if not (one_level or two_levels):
        return ("object-misplaced", path, f"object {name} is in the wrong shard")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return ("object-unreadable", path, exc.strerror or str(exc))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ("object-corrupt", path, "not a regular file")
        digest, _ = hash_fd(fd)
    finally:
        os.close(fd)
    if digest.hex() != name:
        return ("object-corrupt", path, f"content hashes to {digest.hex()}, not {name}")
    if st.st_mode & 0o222:
        return ("object-writable", path, f"mode {stat.S_IMODE(st.st_mode):o}: objects are 0444")
    return None


def _check_chunk(items: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    return [r for r in map(_check_object, items) if r is not None]


def _same_file(a: str, b: os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except FileNotFoundError:
        return False


def _check_short_names(store: Store, m: Manifests, present: set[str]) -> list[Finding]:
    """Every name in ids-v1 (the data-only layer) is a hard link of the object it names: same
    inode, so the object's re-hash above covers its bytes too."""
    ids = store.root / "ids-v1"
    if not ids.is_dir():
        return []
    by_prefix: dict[str, list[str]] = {}
    for h in present:
        by_prefix.setdefault(h[:20], []).append(h)
    with m.read() as txn:
        longer = {bytes(v).decode(): bytes(k).hex() for k, v in txn.cursor(db=m.ids)}
    renamed = set(longer.values())  # objects whose prefix collided: they use their longer id
    out = []
    for shard in sorted(os.scandir(ids), key=lambda e: e.name):
        for e in os.scandir(shard.path):
            short = shard.name + e.name
            if short.endswith(".tmp"):
                continue
            if short in longer:
                candidates = [longer[short]]
            else:
                candidates = [h for h in by_prefix.get(short, ()) if h not in renamed]
            if not candidates:
                out.append(Finding("id-stray", e.path, "names no object in the store"))
                continue
            if not any(_same_file(e.path, store.object_path(bytes.fromhex(h))) for h in candidates):
                shown = " or ".join(h[:24] for h in candidates)
                out.append(Finding("id-mismatch", e.path, f"is not a hard link of {shown}"))
    return out


def fsck(
    store: Store,
    m: Manifests,
    *,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> FsckReport:
    rep = FsckReport()
    items = [(n, os.fspath(p)) for n, p in store.iter_objects()]
    rep.objects = len(items)
    present = {n for n, _ in items}
    jobs = jobs or default_jobs()
    chunks = [items[i : i + 256] for i in range(0, len(items), 256)]
    checked = 0
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(Workers(jobs)) if jobs > 1 and len(items) > 2000 else None
        results = pool.map_unordered(_check_chunk, chunks) if pool else map(_check_chunk, chunks)
        for found in results:
            rep.findings.extend(Finding(*r) for r in found)
            checked += 256
            if progress is not None:
                progress(min(checked, len(items)), len(items))
    rep.findings.extend(_check_short_names(store, m, present))
    # --link proxies of shim sessions: the documented limit is that a writer the shim cannot
    # see may change one; this is where that is detected.
    from veloverlay.session.shim.materialize import verify_proxies

    rep.findings.extend(Finding(f.kind, f.path, f.detail) for f in verify_proxies(store))
    # Manifest side: every node decodes and hashes to its key, every reference resolves.
    from veloverlay.store.digest import node_digest

    with m.read() as txn:
        for key, data in m.iter_nodes(txn):
            rep.nodes += 1
            if node_digest(data) != key:
                rep.findings.append(
                    Finding("node-corrupt", key.hex(), "encoding does not hash to its key")
                )
                continue
            try:
                node = m.get_node(txn, key)
            except VeloError as exc:
                rep.findings.append(Finding("node-corrupt", key.hex(), exc.message))
                continue
            for e in node.entries:
                if e.kind is Kind.FILE and e.digest.hex() not in present:
                    rep.findings.append(
                        Finding(
                            "object-missing",
                            e.digest.hex(),
                            f"referenced as {paths.display(e.name)} in node {key.hex()[:16]}",
                        )
                    )
                elif e.kind is Kind.DIR and not m.has_node(txn, e.digest):
                    rep.findings.append(
                        Finding("node-missing", e.digest.hex(), f"child {paths.display(e.name)}")
                    )
        commits = {}
        for c in m.iter_commits(txn):
            commits[c.id] = c
            rep.commits += 1
            if not m.has_node(txn, bytes.fromhex(c.root)):
                rep.findings.append(Finding("node-missing", c.root, f"root of commit {c.id[:16]}"))
        for ref in m.refs(txn):
            rep.refs += 1
            if ref.head not in commits:
                rep.findings.append(Finding("commit-missing", ref.head, f"head of ref {ref.name}"))
    return rep
