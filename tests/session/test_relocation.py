"""Baked absolute paths: found near the top of a tree, cached per root, and carried to a new
root without a new search when the changes since cannot matter."""

from __future__ import annotations

import os

import pytest

from veloverlay.ingest import ingest
from veloverlay.session import relocation
from veloverlay.store.tree import Entry, Kind, Op, OpKind
from veloverlay.verbs.repo import Repo


def _put_file(repo: Repo, root: bytes, path: bytes, data: bytes) -> bytes:
    with repo.store.stage() as st:
        digest = st.add_bytes(data)
        st.publish()
    entry = Entry(path.rpartition(b"/")[2], Kind.FILE, 0o755, len(data), 1, digest, b"", 2)
    with repo.m.write() as txn:
        return repo.m.apply(txn, root, [Op(OpKind.PUT, path, entry)])


def test_found_cached_and_carried(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = os.path.join(shm_tmp, "venv")
    os.makedirs(f"{venv}/bin")
    os.makedirs(f"{venv}/lib/deep/er/still")
    with open(f"{venv}/pyvenv.cfg", "w") as f:
        f.write(f"home = /usr/bin\ncommand = /usr/bin/python3 -m venv {venv}\n")
    with open(f"{venv}/bin/pip", "w") as f:
        f.write(f"#!{venv}/bin/python\n")
    with open(f"{venv}/bin/other", "w") as f:
        f.write(f"#!{venv}2/bin/python\n")  # a longer path that only starts like it
    root = bytes.fromhex(ingest(repo.store, repo.m, venv, "v", jobs=1).root)
    count, found = relocation.cached_find_baked(repo.store, repo.m, root, venv)
    assert (count, found) == (2, ["pyvenv.cfg", "bin/pip"])

    # A change deep down (outside what the search looks at): the answer is carried over.
    deep = _put_file(repo, root, b"lib/deep/er/still/mod.py", f"# {venv}/x\n".encode())

    def no_search(*_a: object, **_k: object) -> None:
        raise AssertionError("searched again")

    monkeypatch.setattr(relocation, "find_baked", no_search)
    assert relocation.cached_find_baked(repo.store, repo.m, deep, venv, ancestors=[root]) == (
        2,
        ["pyvenv.cfg", "bin/pip"],
    )
    monkeypatch.undo()
    # A new script in bin/: searched again, and found.
    more = _put_file(repo, deep, b"bin/tool", f"#!{venv}/bin/python\n".encode())
    count, found = relocation.cached_find_baked(repo.store, repo.m, more, venv, ancestors=[deep])
    assert count == 3 and "bin/tool" in found
