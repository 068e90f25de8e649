"""`checkout` and `export -o` refuse a destination inside the store (target-invalid), as a
session's `--at` and an ingest source already did.

Found by running the documented commands with paths in the store: `checkout proj
STORE/objects-v2/8e` made a new fan-out directory and wrote the tree's files there, so a file
named as the BLAKE3 of `hello\\n` holding other bytes became that object; the next ingest of a
file `hello\\n` stored nothing ("dedup") and its version read back the other bytes: the store
lied (P0-a). `export -o STORE/objects-v2/ab/<name>` renames the bundle over an object the same
way (root-free, where objects are not immutable)."""

from __future__ import annotations

import os

import blake3
import pytest

from tests.helpers.trees import make_tree
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.bundle import export_to_path
from veloverlay.verbs.repo import Repo

HELLO = b"hello\n"


def test_checkout_into_a_new_fanout_directory_cannot_plant_an_object(
    repo: Repo, shm_tmp: str
) -> None:
    name = blake3.blake3(HELLO).hexdigest()
    evil = os.path.join(shm_tmp, "evil")
    make_tree(evil, {name: b"other!"})  # the same size as HELLO: only a re-hash would tell
    ingest(repo.store, repo.m, evil, "evil", jobs=1)
    fanout = os.path.join(repo.store.root, "objects-v2", name[:2])
    assert not os.path.exists(fanout)

    with pytest.raises(VeloError) as err:
        repo.checkout("evil", fanout)
    assert err.value.reason is Reason.TARGET_INVALID
    assert not os.path.exists(fanout)

    good = os.path.join(shm_tmp, "good")
    make_tree(good, {"f": HELLO})
    ingest(repo.store, repo.m, good, "good", jobs=1)
    out = os.path.join(shm_tmp, "out")
    with open(out, "wb") as f:
        repo.cat("good", "f", f)
    with open(os.path.join(good, "f"), "rb") as f, open(out, "rb") as g:
        assert g.read() == f.read()


@pytest.mark.parametrize("where", ["store", "store/sub", "store/tmp/x"])
def test_checkout_into_or_below_the_store_is_refused(repo: Repo, shm_tmp: str, where: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a": b"x\n"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    dest = os.path.join(shm_tmp, where)
    with pytest.raises(VeloError) as err:
        repo.checkout("t", dest)
    assert err.value.reason is Reason.TARGET_INVALID
    assert where == "store" or not os.path.exists(dest)


def test_export_over_an_object_is_refused(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a": b"x\n"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    digest = blake3.blake3(b"x\n").hexdigest()
    obj = os.path.join(repo.store.root, "objects-v2", digest[:2], digest)
    with open(obj, "rb") as f:
        before = f.read()
    for output in (obj, os.path.join(repo.store.root, "b.velo")):
        with pytest.raises(VeloError) as err:
            export_to_path(repo.store, repo.m, "t", output)
        assert err.value.reason is Reason.TARGET_INVALID
    assert not os.path.exists(os.path.join(repo.store.root, "b.velo"))
    with open(obj, "rb") as f:
        assert f.read() == before == b"x\n"


def test_checkout_into_a_per_boot_layer_cache_is_refused(
    repo: Repo, shm_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions mount what lies under a per-boot layer cache and gc prunes it by walking it;
    a session's target there was refused, a checkout was not (found by the docs audit)."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"f": b"x"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    runtime = os.path.join(shm_tmp, "rt")
    cache = os.path.join(runtime, f"veloverlay-{os.geteuid()}")
    os.makedirs(cache, 0o700)
    os.chmod(cache, 0o700)
    monkeypatch.setenv("VELO_RUNTIME_DIR", runtime)
    with pytest.raises(VeloError) as err:
        repo.checkout("t", os.path.join(cache, "co"))
    assert err.value.reason is Reason.TARGET_INVALID
    assert os.listdir(cache) == []
    repo.checkout("t", os.path.join(runtime, "beside"))  # next to it is fine


@pytest.mark.parametrize("dest", ["/proc/velo-co", "/proc/sys/velo-co", "/sys/kernel/velo-co"])
def test_checkout_onto_a_kernel_interface_is_refused_and_named(
    repo: Repo, shm_tmp: str, dest: str
) -> None:
    """A destination on /proc or /sys, as a session's target there (mkdir fails there as if the
    parent were missing). Old code: not-found, "the parent of /proc/velo-co does not exist"."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"f": b"x"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    assert os.path.isdir(os.path.dirname(dest))  # the parent is there
    with pytest.raises(VeloError) as err:
        repo.checkout("t", dest)
    assert err.value.reason is Reason.TARGET_INVALID, err.value
    assert err.value.message.startswith(f"the destination {dest} is on "), err.value
    assert not os.path.exists(dest)
