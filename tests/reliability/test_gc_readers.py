"""gc against the verbs that read objects (`checkout`, `export`, `cat`): they resolve a version
in one read of the manifests and open its objects afterwards, one by one, so a `gc` that drops
that version meanwhile (`gc --keep 1` of an older version, or of a deleted ref) must wait for
them, or they end half way with `object-missing` (and its hint to run `fsck --repair` on a store
that is whole), leaving a half-written checkout behind.

Found by running `gc --keep 1 --grace 0` while `checkout t@{1}` was writing its first file: gc
deleted the objects of version 1, and the checkout failed on the next one. gc is started exactly
then (the reader's first `open_object`), and the test waits until it has either finished or
blocks on the store lock (`/proc/locks` shows it waiting): no sleep decides the outcome."""

from __future__ import annotations

import io
import os
import shutil

import pytest

from tests.helpers.races import GC_KEEP_1, verb_at_first_call
from tests.helpers.trees import assert_same_tree, make_tree
from veloverlay.ingest import ingest
from veloverlay.store.bundle import export_to_path, import_bundle
from veloverlay.store.cas import Store
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.repo import Repo

V1 = {"a.txt": b"version one\n", "d/only-in-one": b"one" * 1000, "d/b": b"bee\n"}
V2 = {"a.txt": b"version two\n"}


def _two_versions(shm_tmp: str) -> tuple[str, str]:
    """A store whose ref `t` has two versions (V1 then V2), and a copy of V1's source tree."""
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "src")
    make_tree(src, V1)  # type: ignore[arg-type]
    want = os.path.join(shm_tmp, "v1")
    shutil.copytree(src, want, symlinks=True)
    repo = Repo.open(store, create=True)
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
        shutil.rmtree(os.path.join(src, "d"))
        make_tree(src, V2)  # type: ignore[arg-type]
        ingest(repo.store, repo.m, src, "t", jobs=1)
    finally:
        repo.close()
    return store, want


@pytest.mark.parametrize("reader", ["checkout", "export", "cat"])
def test_gc_waits_for_a_reader_of_the_version_it_drops(
    shm_tmp: str, reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, want = _two_versions(shm_tmp)
    procs = verb_at_first_call(monkeypatch, Store, "open_object", store, GC_KEEP_1)
    out = os.path.join(shm_tmp, "out")
    repo = Repo.open(store)
    try:
        if reader == "checkout":
            repo.checkout("t@{1}", out)
        elif reader == "export":
            export_to_path(repo.store, repo.m, "t@{1}", out + ".velo")
        else:
            buf = io.BytesIO()
            repo.cat("t@{1}", "d/only-in-one", buf)
    finally:
        repo.close()
    assert procs
    _o, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0, err  # gc ran, after the reader

    # The reader got all of version 1, as if it had run before gc.
    if reader == "checkout":
        assert_same_tree(out, want)
    elif reader == "export":
        other = Repo.open(os.path.join(shm_tmp, "other"), create=True)
        try:
            with open(out + ".velo", "rb") as f:
                import_bundle(other.store, other.m, f, name="v1")
            other.checkout("v1", out)
        finally:
            other.close()
        assert_same_tree(out, want)
    else:
        assert buf.getvalue() == V1["d/only-in-one"]
    # ... and gc still did its work once the reader was done.
    repo = Repo.open(store)
    try:
        assert len(repo.log("t")) == 1
        report = fsck(repo.store, repo.m, jobs=1)
        assert report.ok, report.findings
    finally:
        repo.close()


@pytest.mark.parametrize("how", ["--stat", "-p"])
def test_gc_waits_for_a_diff_reading_the_version_it_drops(
    shm_tmp: str, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`diff --stat` and `diff -p` list the changes, then read both sides' objects change by
    change: gc dropping version 1 in between made them fail with object-missing."""
    from veloverlay import cli

    store, _want = _two_versions(shm_tmp)
    procs = verb_at_first_call(monkeypatch, Store, "open_object", store, GC_KEEP_1)
    rc = cli.main(["--store", store, "diff", how, "t@{1}", "t"])
    out, err = capsys.readouterr()
    assert procs
    _o, gc_err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0, gc_err
    assert rc == 0, err
    if how == "-p":
        assert "-version one" in out and "+version two" in out, out
    else:
        assert "a.txt" in out and "d/b" in out, out


def test_gc_waits_for_a_patch_being_read(shm_tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Repo.patch` read a change's two objects without the store lock: a library caller that
    had not taken `repo.reading()` (as `diff -p` does) had the new side deleted by a `gc --keep
    1` that ran while it read the old one, and got `object-missing` (found by starting gc at
    patch's first object). patch now holds the lock (shared) while it reads both."""
    store, _want = _two_versions(shm_tmp)
    repo = Repo.open(store)
    try:
        (change,) = [c for c in repo.changes("t@{1}", "t") if os.fsdecode(c.path) == "a.txt"]
        # (the objects of version 1 go with it: gc --keep 1 drops it)
        procs = verb_at_first_call(monkeypatch, Store, "open_object", store, GC_KEEP_1)
        lines = repo.patch(change)
    finally:
        repo.close()
    assert procs
    _o, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 0, err  # gc ran, after the patch was read
    assert lines is not None
    assert "-version one\n" in lines and "+version two\n" in lines, lines
