"""What an import holds in memory does not grow with the node records a bundle carries.

A hostile bundle of hundreds of thousands of tiny node records, none of them in the tree, is
imported in a child process whose peak RSS is compared with a child importing the same tree
without them: the records must not be held in memory until the end record.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys

from tests.store.test_bundle import build, file_entry, meta, node, obj
from veloverlay.store import tree

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
    records = [meta(rd), rrec, obj(b"ok")]
    for i in range(extra):  # empty directories, each with its own mtime: distinct digests
        records.append(node(struct.pack("<4sIqI", b"VDN1", 0o755, i + 2, 0))[1])
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
