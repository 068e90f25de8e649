"""What an import holds in memory, and stores, does not grow with the records a bundle carries
outside its tree.

A hostile bundle of hundreds of thousands of tiny node records, none of them in the tree, is
imported in a child process whose peak RSS is compared with a child importing the same tree
without them: the records must not be held in memory until the end record.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys

import pytest

from tests.helpers.unpriv import run_in_userns
from tests.store.test_bundle import assert_invalid, build, dst, file_entry, meta, node, obj
from veloverlay.store import tree
from veloverlay.store.bundle import import_bundle
from veloverlay.store.digest import hash_bytes
from veloverlay.store.tree import Entry, Kind
from veloverlay.verbs.repo import Repo

__all__ = ["dst"]  # the fixture, shared with test_bundle.py

EXTRA = 400_000  # 61-byte records: 24 MB of bundle, over 80 MB as a dict of bytes
BOUND = 24 << 20  # what the extra records may add to the peak RSS

_CHILD = """
import sys
from veloverlay.store.bundle import import_bundle
from veloverlay.verbs.repo import Repo
r = Repo.open(sys.argv[1], create=True)
with open(sys.argv[2], "rb") as f:
    info = import_bundle(r.store, r.m, f)
r.close()
# VmHWM: this program's peak (ru_maxrss would keep the forking test's own, across the exec)
peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(info["nodes"], int(peak) * 1024)
"""


def _bundle(path: str, extra: int) -> None:
    rd, rrec = node(tree.encode(0o755, 1, [file_entry(b"a", b"ok")])[1])
    records = [meta(rd), rrec]
    for i in range(extra):  # empty directories, each with its own mtime: distinct digests
        records.append(node(struct.pack("<4sIqI", b"VDN1", 0o755, i + 2, 0))[1])
    records.append(obj(b"ok"))  # (as export writes them: the nodes, then the objects)
    with open(path, "wb") as f:
        f.write(build(records))


def _peak(shm_tmp: str, name: str, extra: int) -> int:
    path = os.path.join(shm_tmp, f"{name}.velo")
    _bundle(path, extra)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, os.path.join(shm_tmp, name), path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    os.unlink(path)
    assert out[0] == "1"  # the root's node only: the others are outside the tree
    return int(out[1])


def test_node_records_outside_the_tree_are_not_held_in_memory(shm_tmp: str) -> None:
    plain = _peak(shm_tmp, "plain", 0)
    hostile = _peak(shm_tmp, "hostile", EXTRA)
    assert hostile - plain < BOUND, (plain, hostile)
    assert os.listdir(os.path.join(shm_tmp, "hostile", "tmp")) == []


def test_objects_outside_the_tree_are_read_past_not_stored(dst: Repo) -> None:
    """Object records no file of the tree names are not staged, published or counted (old code
    staged each as a file, held it in three dicts, and published it into the store)."""
    rd, rrec = node(tree.encode(0o755, 1, [file_entry(b"a", b"ok")])[1])
    extra = [obj(b"extra %d" % i) for i in range(2000)]
    info = import_bundle(dst.store, dst.m, io.BytesIO(build([meta(rd), rrec, obj(b"ok"), *extra])))
    assert info["objects"] == 1
    assert {n for n, _p in dst.store.iter_objects()} == {hash_bytes(b"ok").hex()}
    assert os.listdir(dst.store.tmp) == []


def test_a_node_record_after_the_objects_is_refused(dst: Repo) -> None:
    """Export writes every node before the objects; import stages only the objects the nodes
    read so far name, so a node record after an object is refused (it could name objects already
    read past)."""
    sub_d, sub = node(tree.encode(0o755, 1, [file_entry(b"b", b"late")])[1])
    rd, rrec = node(tree.encode(0o755, 1, [Entry(b"s", Kind.DIR, digest=sub_d)])[1])
    assert_invalid(dst, build([meta(rd), rrec, obj(b"late"), sub]))


def _import_without_proc(store: str, data: bytes) -> int:
    from veloverlay import _libc

    _libc.mount("none", "/proc", "tmpfs", 0, None)
    r = Repo.open(store, create=True)
    try:
        return int(import_bundle(r.store, r.m, io.BytesIO(data))["nodes"])
    finally:
        r.close()


@pytest.mark.needs("userns")
def test_an_import_works_where_proc_is_not_mounted(shm_tmp: str) -> None:
    """The node records' scratch database is opened by the stage's path when /proc/self/fd
    cannot be read (a chroot): the import does not depend on /proc."""
    rd, rrec = node(tree.encode(0o755, 1, [file_entry(b"a", b"ok")])[1])
    data = build([meta(rd), rrec, obj(b"ok")])
    store = os.path.join(shm_tmp, "noproc")
    assert run_in_userns(_import_without_proc, store, data, privileged=True) == 1
    r = Repo.open(store)
    try:
        out = io.BytesIO()
        r.cat("hand", "a", out)
        assert out.getvalue() == b"ok"
        assert [ref.name for ref, _c in r.refs()] == ["hand"]
    finally:
        r.close()
    assert os.listdir(os.path.join(store, "tmp")) == []
