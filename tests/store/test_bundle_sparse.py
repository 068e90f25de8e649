"""A sparse file's holes in a bundle. The format has no hole record and no compression (a reader
takes an object record's bytes as they are), so a bundle carries a sparse file's whole size: its
holes as zeros. An export into a file wrote them as data too: an 8 GiB sparse file made 8 GiB of
disk. The export now seeks over an object's chunks of zeros, so the bundle file has holes where
the files had; the bytes read back, and so the checksum and every import, are the same."""

from __future__ import annotations

import os

from tests.helpers.trees import assert_same_tree
from veloverlay.ingest import ingest
from veloverlay.store.bundle import export_to_path, import_bundle
from veloverlay.verbs.repo import Repo

SIZE = 64 << 20


def test_a_sparse_file_exports_into_a_sparse_bundle(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    os.mkdir(src)
    with open(os.path.join(src, "disk.img"), "wb") as f:
        f.write(b"head")
        f.seek(SIZE // 2)
        f.write(b"middle" * 1000)
        f.truncate(SIZE)  # ends in a hole
    with open(os.path.join(src, "small"), "wb") as f:
        f.write(b"\0" * 100 + b"x")  # a short object of zeros is written as it is
    ingest(repo.store, repo.m, src, "sp", jobs=1)
    out = os.path.join(shm_tmp, "sp.velo")
    export_to_path(repo.store, repo.m, "sp", out)
    st = os.stat(out)
    assert st.st_size > SIZE  # the format carries the whole size
    assert st.st_blocks * 512 < SIZE // 8, f"{st.st_blocks * 512:,} bytes on disk"
    dst = Repo.open(os.path.join(shm_tmp, "dst"), create=True)
    try:
        with open(out, "rb") as f:
            import_bundle(dst.store, dst.m, f)
        back = os.path.join(shm_tmp, "back")
        dst.checkout("sp", back)
        assert_same_tree(src, back)
    finally:
        dst.close()
