"""`status` / `diff --session` of a running overlay session read its upper dir while the session
writes it: a directory there swapped for a symlink (the session can make one at any name) is never
followed, so root's diff never shows the bytes of a file outside the upper dir."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.session._util import new_store
from veloverlay.session import live
from veloverlay.session.overlay.live import placeholder, upper_ops
from veloverlay.store.changes import Change
from veloverlay.store.manifest import Manifests
from veloverlay.store.tree import Entry, Kind, OpKind


def test_a_symlinked_directory_in_the_upper_dir_is_not_followed(tmp_path: object) -> None:
    base = os.fspath(tmp_path)  # type: ignore[call-overload]
    store, _src = new_store(base)
    victim = os.path.join(base, "victim")
    os.mkdir(victim, 0o700)
    with open(os.path.join(victim, "secret"), "w") as f:
        f.write("root's secret\n")
    upper = os.path.join(base, "upper")
    os.makedirs(os.path.join(upper, "newdir"))
    with open(os.path.join(upper, "newdir", "secret"), "w") as f:
        f.write("mine\n")
    m = Manifests(store)
    try:
        with m.read() as txn:
            _ref, c = m.resolve(txn, "t")
        view = bytes.fromhex(c.root)
        # Listed while newdir was a directory; read after the session swapped in a symlink.
        with m.what_if() as txn:
            [put] = upper_ops(m, txn, upper, view)
            assert put.path == b"newdir" and put.entry is not None
            assert [e.name for e in m.get_node(txn, put.entry.digest).entries] == [b"secret"]
        os.rename(os.path.join(upper, "newdir"), os.path.join(upper, "olddir"))
        os.symlink(victim, os.path.join(upper, "newdir"))
        new = Entry(b"secret", Kind.FILE, 0o644, 5, 0, placeholder(b"newdir/secret"))
        change = Change("A", b"newdir/secret", None, new)
        got = live._from_upper(store, change, os.fsencode(upper), 3)
    finally:
        m.close()
    assert got.patch is not None
    assert not any("secret" in line and "root" in line for line in got.patch), got.patch
    assert got.new_size == 0


def test_a_symlink_gone_between_listing_and_reading_is_skipped(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session removes a symlink of its upper dir after `upper_ops` listed it and before it
    read its target: that entry is left out (it is gone), the rest is read; `status` did not
    fail with the readlink's OSError."""
    base = os.fspath(tmp_path)  # type: ignore[call-overload]
    store, _src = new_store(base)
    upper = os.path.join(base, "upper")
    os.makedirs(os.path.join(upper, "newdir"))
    for d in ("", "newdir"):
        os.symlink("target", os.path.join(upper, d, "gone"))
        with open(os.path.join(upper, d, "kept"), "w") as f:
            f.write("k\n")
    real = os.readlink

    def racing(path: Any, *, dir_fd: int | None = None) -> Any:
        if os.fsdecode(path) == "gone":  # removed by the session meanwhile
            os.unlink(path, dir_fd=dir_fd)
        return real(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "readlink", racing)
    m = Manifests(store)
    try:
        with m.read() as txn:
            view = bytes.fromhex(m.resolve(txn, "t")[1].root)
        with m.what_if() as txn:
            ops = upper_ops(m, txn, upper, view)
            assert [(op.kind, op.path) for op in ops] == [
                (OpKind.PUT, b"kept"),
                (OpKind.PUT, b"newdir"),
            ]
            put = ops[1].entry
            assert put is not None
            assert [e.name for e in m.get_node(txn, put.digest).entries] == [b"kept"]
    finally:
        m.close()
