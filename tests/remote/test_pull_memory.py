"""A pull's memory follows the nodes it needs, not the packs they come in: a version may name
many node packs (each up to 256 MiB) holding entries no walk reads. They were all kept in memory
until the walk ended; now they wait in an unnamed file in the store's tmp/. Measured as the peak
RSS of a child process that pulls (VmHWM: ru_maxrss outlives exec, so it would be the forking
test's), against the same child pulling a small version."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.cli import TOP
from tests.helpers.trees import assert_same_tree, make_tree
from tests.remote.fake_registry import FakeRegistry, file_entry, one_dir
from veloverlay.store import tree
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

_CHILD = """
import sys
from veloverlay.remote import Options, pull
from veloverlay.verbs.repo import Repo
r = Repo.open(sys.argv[1])
pull(r.store, r.m, sys.argv[2], name=sys.argv[3], options=Options(retries=0, timeout=60))
r.close()
print(next(x.split()[1] for x in open("/proc/self/status") if x.startswith("VmHWM:")))
"""
PACKS, JUNK = 8, 24 << 20  # 192 MiB of node packs no walk needs


def _peak_kib(repo: Repo, remote: str, name: str) -> int:
    env = {**os.environ, "PYTHONPATH": TOP}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(repo.store.root), remote, name],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return int(out.stdout.split()[-1])


def test_node_packs_are_not_held_in_memory(fake: FakeRegistry, repo: Repo, shm_tmp: str) -> None:
    small, small_nodes = one_dir([file_entry(b"x", b"x")])
    fake.serve_version(small_nodes, {hash_bytes(b"x"): b"x"}, small, tag="small")
    src = os.path.join(shm_tmp, "src")
    files = {f"s{i}/f": b"data %d\n" % i for i in range(PACKS)}
    make_tree(src, dict(files))
    groups: list[dict[bytes, bytes]] = []
    subdirs = []
    for i in range(PACKS):
        d, nodes = one_dir([file_entry(b"f", files[f"s{i}/f"])])
        junk = os.urandom(16) * (JUNK // 16)
        groups.append({**nodes, os.urandom(32): junk})  # an entry the tree never names
        subdirs.append(tree.Entry(b"s%d" % i, tree.Kind.DIR, digest=d))
    root, top = one_dir(subdirs)
    groups.append(top)
    objects = {hash_bytes(v): v for v in files.values()}
    fake.serve_version({}, objects, root, tag="big", node_packs=groups)
    del groups
    base = _peak_kib(repo, fake.remote("small"), "small")
    peak = _peak_kib(repo, fake.remote("big"), "big")
    assert peak - base < (PACKS * JUNK >> 10) // 4, (base, peak)
    out = os.path.join(shm_tmp, "out")
    repo.checkout("big", out)
    assert_same_tree(out, src, mtimes=False, dir_mtimes=False)
    assert os.listdir(repo.store.tmp) == []  # (the packs' file had no name)
