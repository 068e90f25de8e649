"""The store's fs-verity hook (cas.Stage.publish -> verity.seal) and fsck's use of it, on any host.

This machine's kernel has no fs-verity; the tests here pin what the hook does around the kernel
call: where the store's probe says no, nothing changes (no seal, no inode-flag ioctl, the probe
runs once per boot and store); where it says yes, every object is sealed in the stage, before it
gets its name, also when the renames are spread over worker processes; a seal that fails names
nothing. The real kernel behaviour is tested in tests/kernel/test_verity.py (matrix box
deb13-verity).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.trees import make_tree
from veloverlay import verity
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck


def _tree(root: str, n: int) -> dict[str, bytes]:
    files = {f"d{i % 7}/f{i}": b"file %d\n" % i for i in range(n)}
    make_tree(root, dict(files))
    return files


def _count_probes(monkeypatch: pytest.MonkeyPatch, answer: tuple[bool, str]) -> list[str]:
    calls: list[str] = []

    def fake(directory: object) -> tuple[bool, str]:
        # the store's tmp/, reached by its descriptor (/proc/self/fd/N/tmp): where it leads
        calls.append(os.path.realpath(os.fsdecode(directory)))  # type: ignore[arg-type]
        return answer

    monkeypatch.setattr(verity, "usable_under", fake)
    return calls


def test_without_fsverity_nothing_changes(monkeypatch: pytest.MonkeyPatch, shm_tmp: str) -> None:
    probes = _count_probes(monkeypatch, (False, "no fs-verity here (test)"))

    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("an fs-verity call on a store without fs-verity")

    for name in ("seal", "seal_at", "enable_fd", "is_enabled_fd", "measure_fd"):
        monkeypatch.setattr(verity, name, forbidden)
    src = os.path.join(shm_tmp, "src")
    files = _tree(src, 40)
    store = Store.init(os.path.join(shm_tmp, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
        with open(os.path.join(src, "new"), "wb") as f:
            f.write(b"later\n")
        ingest(store, m, src, "t", jobs=1)
        rep = fsck(store, m, jobs=1, repair=True)
    finally:
        m.close()
    assert rep.ok and (rep.sealed, rep.unsealed, rep.repaired) == (0, 0, 0)
    assert rep.objects == len(set(files.values())) + 1
    # One probe for the store, in its tmp/; every later publish and a new Store read the cache.
    again = Store.open(store.root)
    assert again.verity() == (False, "no fs-verity here (test)")
    assert probes == [os.fspath(store.tmp)]
    # A new boot (or kernel, or filesystem) probes again.
    monkeypatch.setattr(verity, "_boot_id", lambda: "another-boot")
    assert Store.open(store.root).verity()[0] is False
    assert len(probes) == 2


def _sealing(monkeypatch: pytest.MonkeyPatch, log: str) -> None:
    """verity.seal_at records the staged path it was given (its directory's, by the descriptor,
    and its name), and whether it was still unnamed."""
    _count_probes(monkeypatch, (True, "fs-verity (test)"))

    def fake_seal(dir_fd: int | None, name: bytes) -> bool:
        assert dir_fd is not None, "sealed by name relative to the stage directory"
        path = os.path.join(os.fsencode(os.readlink(f"/proc/self/fd/{dir_fd}")), name)
        assert os.path.exists(path), path
        line = b"%s %s %d\n" % (path, name, os.getpid())
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # forked workers too
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return True

    monkeypatch.setattr(verity, "seal_at", fake_seal)


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_object_is_sealed_in_the_stage_before_it_is_named(
    monkeypatch: pytest.MonkeyPatch, shm_tmp: str, jobs: int
) -> None:
    log = os.path.join(shm_tmp, "sealed.log")
    _sealing(monkeypatch, log)
    src = os.path.join(shm_tmp, "src")
    files = _tree(src, 1100 if jobs > 1 else 30)  # > 2 chunks of 512: renames in workers
    store = Store.init(os.path.join(shm_tmp, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=jobs)
    finally:
        m.close()
    with open(log, "rb") as f:
        lines = [line.split() for line in f.read().splitlines()]
    sealed = [line[0] for line in lines]
    if jobs > 1:  # the renames (and so the seals) ran in the pool's workers
        assert {int(line[2]) for line in lines} - {os.getpid()}, "no seal in a worker"
    objects = [p for _n, p in store.iter_objects()]
    assert len(objects) == len(set(files.values()))
    assert len(sealed) == len(objects), "every object sealed exactly once"
    tmp = os.fsencode(store.tmp) + b"/"
    assert all(p.startswith(tmp) for p in sealed), "sealed in the stage, before the rename"
    # a second ingest of the same content names nothing new and seals nothing
    m = Manifests(store)
    try:
        ingest(store, m, src, "t2", jobs=jobs)
    finally:
        m.close()
    with open(log, "rb") as f:
        assert len(f.read().splitlines()) == len(objects)


@pytest.mark.parametrize(
    ("err", "reason"),
    [(errno.ENOSPC, Reason.STORE_FULL), (errno.EACCES, Reason.STORE_PERMISSION)],
)
def test_a_failed_seal_names_nothing(
    monkeypatch: pytest.MonkeyPatch, shm_tmp: str, err: int, reason: Reason
) -> None:
    _count_probes(monkeypatch, (True, "fs-verity (test)"))

    def failing(dir_fd: int | None, name: bytes) -> bool:
        raise OSError(err, os.strerror(err), name)

    monkeypatch.setattr(verity, "seal_at", failing)
    store = Store.init(os.path.join(shm_tmp, "store"))
    with pytest.raises(VeloError) as exc, store.stage() as stage:
        stage.add_bytes(b"never named\n")
        stage.publish()
    assert exc.value.reason is reason
    assert list(store.iter_objects()) == []
    assert os.listdir(store.tmp) == []  # the stage is gone with its file


def test_fsck_reports_an_unreadable_object_instead_of_crashing(
    monkeypatch: pytest.MonkeyPatch, shm_tmp: str
) -> None:
    """A sealed object whose block fails its Merkle check reads EIO; fsck names it."""
    store = Store.init(os.path.join(shm_tmp, "store"))
    Manifests(store).close()  # (a store with objects and no manifest database is damage)
    with store.stage() as stage:
        digest = stage.add_bytes(b"bytes on a failing disk\n")
        stage.publish()
    import veloverlay.verbs.fsck as verify_mod

    def eio(fd: int) -> object:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(verify_mod, "hash_fd", eio)
    m = Manifests(store)
    try:
        rep = fsck(store, m, jobs=1)
    finally:
        m.close()
    assert [(f.kind, f.what) for f in rep.findings] == [
        ("object-corrupt", os.fspath(store.object_path(digest)))
    ]
    assert "read failed" in rep.findings[0].detail


def _make_the_cache_lie(store: str) -> str:
    """The store's fsverity-v1.json, which a real probe wrote saying no, rewritten to say
    fs-verity works; its path."""
    cache = os.path.join(store, "fsverity-v1.json")
    with open(cache) as f:
        data = json.load(f)
    assert data["ok"] is False
    with open(cache, "w") as f:
        json.dump({**data, "ok": True, "reason": "works (damaged)"}, f)
    return cache


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_cache_that_says_verity_works_where_it_does_not_is_probed_again(
    shm_tmp: str, jobs: str
) -> None:
    """fsverity-v1.json saying fs-verity works (for this boot, kernel, device and euid) on a
    filesystem without it: a store restored onto a filesystem made anew under the same device
    number, or a damaged cache. Every ingest failed with a bare 'ioctl(FS_IOC_ENABLE_VERITY)
    ...: Operation not supported' (ENOTTY on tmpfs) and stored nothing. A seal refused as
    unsupported now probes again, rewrites the cache, and publishes the objects unsealed. (No
    monkeypatching: this machine's /dev/shm has no fs-verity; the probe is real.)"""
    if verity.usable_under(shm_tmp)[0]:
        pytest.skip("fs-verity works here: no wrong cache to make")
    store = os.path.join(shm_tmp, "store")
    files = _tree(os.path.join(shm_tmp, "src"), 40)

    def velo(*args: str) -> subprocess.CompletedProcess[str]:
        return velo_text(store, "--json", *args, env={"VELO_JOBS": jobs})

    make_tree(os.path.join(shm_tmp, "first"), {"a": b"first\n"})
    assert velo("ingest", os.path.join(shm_tmp, "first"), "--name", "first").returncode == 0
    cache = _make_the_cache_lie(store)
    r = velo("ingest", os.path.join(shm_tmp, "src"), "--name", "t")
    assert r.returncode == 0, r.stdout + r.stderr
    for rel, data_ in files.items():
        got = velo("cat", "t", rel)
        assert got.returncode == 0 and got.stdout.encode() == data_, (rel, got)
    with open(cache) as f:
        assert json.load(f)["ok"] is False  # written again by the probe
    assert velo("fsck").returncode == 0


def test_fsck_repair_probes_again_where_the_cache_is_wrong(shm_tmp: str) -> None:
    """The same wrong cache met by `fsck --repair`: each seal was refused (ENOTTY), the objects
    were counted as "unsealed" with the hint to run fsck --repair, which could never seal them,
    and the cache stayed wrong. Now fsck probes again as publish does: the cache is written
    again and no object is counted as unsealed. (Real probe: /dev/shm has no fs-verity.)"""
    if verity.usable_under(shm_tmp)[0]:
        pytest.skip("fs-verity works here: no wrong cache to make")
    store = os.path.join(shm_tmp, "store")
    _tree(os.path.join(shm_tmp, "src"), 10)

    def velo(*args: str) -> subprocess.CompletedProcess[str]:
        return velo_text(store, "--json", *args)

    assert velo("ingest", os.path.join(shm_tmp, "src"), "--name", "t").returncode == 0
    cache = _make_the_cache_lie(store)
    r = velo("fsck", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["fsverity"] == {"sealed": 0, "unsealed": 0, "repaired": 0}, r
    with open(cache) as f:
        assert json.load(f)["ok"] is False  # written again by the probe
    again = velo("fsck")
    assert json.loads(again.stdout)["fsverity"]["unsealed"] == 0, again.stdout
