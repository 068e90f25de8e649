"""Sparse files in shim sessions: a hole stays a hole.

A real tree can hold a disk image or a database file of many GiB that is mostly holes. The overlay
backend and `checkout` keep them sparse; the shim's materialised copy (copy mode) and its
Break-Before-Write copy of a proxy (--link mode) wrote every hole out as zeros, so a 256 MiB image
holding a few bytes cost 256 MiB of disk in the session and again in the store once harvested
(found by projecting real trees against a plain `cp -a` copy). Checked against a plain sparse copy
of the source that received the same write.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, fsck_ok
from tests.shim._util import run_shim
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests

SIZE = 256 << 20
SMALL = 8 << 20  # far more than the few data blocks, far less than SIZE


def _sparse(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"head")
        f.seek(SIZE // 2)
        f.write(b"mid")
        f.truncate(SIZE)


def _allocated(path: str) -> int:
    return os.lstat(path).st_blocks * 512


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _scenario(base: str, link: bool) -> dict[str, object]:
    src = os.path.join(base, "src")
    os.mkdir(src)
    _sparse(os.path.join(src, "written.img"))
    _sparse(os.path.join(src, "untouched.img"))
    if _allocated(os.path.join(src, "written.img")) >= SMALL:
        pytest.skip("this filesystem keeps no holes")
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    plain = os.path.join(base, "plain")  # the same write on a plain sparse copy
    subprocess.run(["cp", "-a", "--sparse=always", src, plain], check=True)
    with open(os.path.join(plain, "written.img"), "ab") as f:
        f.write(b"tail")
    proj = os.path.join(base, "proj")
    seen = os.path.join(base, "seen")
    res = run_shim(
        store,
        "t",
        [
            "sh",
            "-euc",
            f"cd {proj}; printf tail >> written.img; "
            f"stat -c '%n %b %B' written.img untouched.img > {seen}",
        ],
        link=link,
        at=proj,
    )
    with open(seen) as f:
        in_session = {n: int(b) * int(unit) for n, b, unit in (ln.split() for ln in f)}
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    stored = sum(
        _allocated(os.path.join(d, n)) for d, _s, names in os.walk(store.objects) for n in names
    )
    return {
        "status": res.exit_status,
        "in_session": in_session,
        "stored": stored,
        "same": {
            n: _digest(os.path.join(got, n)) == _digest(os.path.join(plain, n))
            for n in ("written.img", "untouched.img")
        },
        "fsck": fsck_ok(store),
    }


@pytest.mark.parametrize("mode", ["root", "rootfree"])
@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_a_sparse_file_stays_sparse_in_the_session_and_the_store(mode: str, link: bool) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _scenario, base, link)
    assert out["status"] == 0
    assert out["same"] == {"written.img": True, "untouched.img": True}
    in_session = out["in_session"]
    assert isinstance(in_session, dict)
    assert all(v < SMALL for v in in_session.values()), in_session
    assert isinstance(out["stored"], int) and out["stored"] < SMALL, out["stored"]
    assert out["fsck"] == []
