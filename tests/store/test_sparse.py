"""Sparse files keep their holes: a disk image or database file of 64 MiB that holds a few
bytes costs a few blocks in the store, in a checkout, after export + import and after a
session wrote it, not 64 MiB of zeros (before: every copy wrote every zero; a 2 GiB sparse
image took 2 GiB of store and 26 s to ingest). The bytes are compared with the source file
itself; the allocation (st_blocks) with the file's size.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import blake3
import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import (
    as_mode,
    fsck_ok,
    mode_form_params,
    mode_params,
    new_store,
    run_session,
    use_form,
)
from veloverlay import linking
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.bundle import export_to_path, import_bundle
from veloverlay.store.cas import Store
from veloverlay.verbs.repo import Repo

SIZE = 64 << 20
SPOTS = ((0, b"head"), (SIZE // 3, b"middle" * 1000), (SIZE - 3, b"end"))  # ends in data
LIMIT = 4 << 20  # a 1 MiB chunk around each spot, at the most, and a filesystem's slack


def _write_sparse(path: str, size: int = SIZE) -> bytes:
    """A file of `size` bytes, data at SPOTS only; returns its BLAKE3."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in SPOTS:
            f.seek(offset)
            f.write(data)
    with open(path, "rb") as f:
        return blake3.blake3(f.read()).digest()


def _allocated(path: str | bytes) -> int:
    return os.stat(path, follow_symlinks=False).st_blocks * 512


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


@pytest.fixture
def disk_tmp() -> Iterator[str]:
    """A temp dir on the machine's disk filesystem (not tmpfs): copy_file_range differs."""
    d = tempfile.mkdtemp(prefix="velo-sparse-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    try:
        yield d
    finally:
        from tests.helpers.trees import force_rmtree

        force_rmtree(d)


@pytest.mark.parametrize("where", ["disk", "shm"])
def test_copy_keeps_holes(where: str, disk_tmp: str, shm_tmp: str) -> None:
    base = disk_tmp if where == "disk" else shm_tmp
    src = os.path.join(base, "src")
    _write_sparse(src)
    for how in ("clone_or_copy", "copy_in_kernel"):
        dst = os.path.join(base, how)
        if how == "clone_or_copy":
            linking.clone_or_copy(src, dst)
        else:
            sfd = os.open(src, os.O_RDONLY)
            dfd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                assert linking.copy_in_kernel(sfd, dfd) is not None
                assert os.lseek(sfd, 0, os.SEEK_CUR) == SIZE  # both at the end, as documented
                assert os.lseek(dfd, 0, os.SEEK_CUR) == SIZE
            finally:
                os.close(sfd)
                os.close(dfd)
        assert _same_bytes(src, dst)
        assert _allocated(dst) <= LIMIT, f"{how}: {_allocated(dst)} bytes allocated"


def test_copy_of_a_file_that_ends_in_a_hole(shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    with open(src, "wb") as f:
        f.write(b"data")
        f.truncate(SIZE)
    dst = os.path.join(shm_tmp, "dst")
    linking.clone_or_copy(src, dst)
    assert os.path.getsize(dst) == SIZE
    assert _same_bytes(src, dst)
    assert _allocated(dst) <= LIMIT


def test_ingest_checkout_export_import(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    os.mkdir(src)
    digest = _write_sparse(os.path.join(src, "disk.img"))
    with open(os.path.join(src, "tail-hole.db"), "wb") as f:
        f.write(b"x" * 5000)
        f.truncate(SIZE)
    ingest(repo.store, repo.m, src, "t", jobs=1)
    obj = repo.store.object_path(digest)
    assert _allocated(obj) <= LIMIT, f"stored object: {_allocated(obj)} bytes allocated"
    out = os.path.join(shm_tmp, "out")
    repo.checkout("t", out)
    for name in ("disk.img", "tail-hole.db"):
        assert _same_bytes(os.path.join(src, name), os.path.join(out, name)), name
        assert _allocated(os.path.join(out, name)) <= LIMIT, name
    bundle = os.path.join(shm_tmp, "t.velo")
    export_to_path(repo.store, repo.m, "t", bundle)
    other = Repo.open(os.path.join(shm_tmp, "other"), create=True)
    try:
        with open(bundle, "rb") as f:
            import_bundle(other.store, other.m, f)
        assert _allocated(other.store.object_path(digest)) <= LIMIT
    finally:
        other.close()
    assert not fsck_ok(other.store)


def _session_writes_sparse(base: str, form: str, backend: str) -> tuple[int, int, bool, list[str]]:
    use_form(form, fresh_cache=os.path.join(base, "runtime"))
    store, src = new_store(base)
    want = os.path.join(base, "want")
    digest = _write_sparse(want)
    script = f"truncate -s {SIZE} img; " + "; ".join(
        f"printf %s {data.decode()!r} | dd of=img bs=1 seek={off} conv=notrunc status=none"
        for off, data in SPOTS
    )
    proj = os.path.join(base, "proj")
    argv = ["sh", "-euc", f"cd {proj}; {script}"]
    res = run_session(store, ["t"], argv, at=proj, backend=backend)
    obj = Store(store.root).object_path(digest)
    return res.exit_status, _allocated(obj), os.path.exists(obj), fsck_ok(store)


_SESSION_PARAMS = mode_form_params(native=True) + [
    pytest.param(p.values[0], "shim", marks=p.marks, id="shim") for p in mode_params("root")
]


@pytest.mark.parametrize("mode,form", _SESSION_PARAMS)
def test_a_session_that_writes_a_sparse_file(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        shim = form == "shim"
        status, allocated, stored, findings = as_mode(
            mode,
            _session_writes_sparse,
            base,
            "data-only" if shim else form,
            "shim" if shim else "overlay",
        )
    assert status == 0
    assert stored, "the session's file is not the object of the source's bytes"
    assert allocated <= LIMIT, f"the committed object: {allocated} bytes allocated"
    assert not findings, findings
