"""A store whose filesystem fills up during a session (issue 14, item 4): the session's command
meets ENOSPC like any program, and veloverlay says `store-full` (the docs' promise), never a
raw `os-error`; nothing committed is lost, and the session can be harvested once there is room."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.fulldisk import fill, private_tmpfs


def _in_small_tmpfs(base: str) -> list[tuple[int, str, str]]:

    mnt = private_tmpfs(base, "3m")
    src = os.path.join(mnt, "src")
    os.makedirs(src)
    with open(os.path.join(src, "a"), "w") as f:
        f.write("hi\n")
    out = []
    for args in (
        ["ingest", src, "--name", "t"],
        [
            "run",
            "t",
            "--at",
            os.path.join(base, "at"),
            "--",
            "sh",
            "-c",
            f"head -c 4000000 /dev/zero > {base}/at/big; echo x > {base}/at/small",
        ],
        ["refs"],
    ):
        p = velo_text(os.path.join(mnt, "store"), "--json", *args)
        out.append((p.returncode, p.stdout, p.stderr))
    return out


@pytest.mark.needs("overlay_root")
def test_a_full_store_during_a_session_is_store_full(shm_tmp: str) -> None:
    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_in_small_tmpfs, shm_tmp)
    assert out[0][0] == 0, out[0]
    rc, _stdout, stderr = out[1]
    assert "reason: store-full" in stderr, stderr
    assert "os-error" not in stderr and "Traceback" not in stderr, stderr
    assert out[2][0] == 0 and '"name": "t"' in out[2][1], out[2]


def _gc_on_a_full_disk(base: str) -> dict[str, object]:

    mnt = private_tmpfs(base, "3m")
    store = os.path.join(mnt, "store")

    def velo(*args: str) -> subprocess.CompletedProcess[str]:
        return velo_text(store, "--json", *args, env={"VELO_RUNTIME_DIR": "off"})

    out: dict[str, object] = {}
    src = os.path.join(base, "old")
    os.makedirs(src)
    for i in range(20):
        with open(os.path.join(src, f"f{i}"), "wb") as f:
            f.write(os.urandom(100_000))
    out["ingest"] = velo("ingest", src, "--name", "old").returncode
    out["delete"] = velo("refs", "--delete", "old").returncode
    filler = os.path.join(mnt, "filler")
    with open(filler, "wb") as f:  # the rest of the disk
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            out["filler"] = exc.errno
    res = velo("gc", "--grace", "0")
    out["gc"] = (res.returncode, res.stdout, res.stderr)
    out["free"] = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    out["fsck"] = velo("fsck").returncode
    os.unlink(filler)
    # the store is whole: a new version goes in and comes out byte for byte
    new = os.path.join(base, "new")
    os.makedirs(new)
    with open(os.path.join(new, "f"), "wb") as f:
        f.write(b"after the full disk\n")
    out["again"] = velo("ingest", new, "--name", "new").returncode
    out["checkout"] = velo("checkout", "new", os.path.join(base, "out")).returncode
    with open(os.path.join(base, "out", "f"), "rb") as f:
        out["same"] = f.read() == b"after the full disk\n"
    out["fsck after"] = velo("fsck").returncode
    return out


def test_gc_frees_room_on_a_full_disk(shm_tmp: str) -> None:
    """With the disk full, LMDB cannot write even a deletion when it has no free page (its
    pages are copied on write), so gc failed with store-full and nothing could free the room
    (found by filling a small tmpfs after deleting a ref). gc now deletes the unreachable
    objects first when the manifest commit meets a full disk, then forgets them."""
    import errno

    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_gc_on_a_full_disk, shm_tmp)
    assert out["ingest"] == out["delete"] == 0, out
    assert out["filler"] == errno.ENOSPC
    rc, stdout, stderr = out["gc"]  # type: ignore[misc]
    assert rc == 0, stderr
    assert json.loads(stdout)["objects_deleted"] == 20
    assert out["free"] >= 1_900_000  # the deleted ref's 2 MB are free again
    assert out["fsck"] == out["again"] == out["checkout"] == out["fsck after"] == 0, out
    assert out["same"]


def _harvest_on_a_full_disk(base: str) -> dict[str, object]:
    """The command's writes fit in the upper dir, but not a second time in the store: the
    harvest meets ENOSPC. Then the filesystem grows and the session is resumed."""
    from veloverlay import _libc

    mnt = private_tmpfs(base, "8m")
    src = os.path.join(mnt, "src")
    os.makedirs(src)
    with open(os.path.join(src, "a"), "w") as f:
        f.write("hi\n")
    at = os.path.join(base, "at")
    store = os.path.join(mnt, "store")

    def velo(*args: str) -> subprocess.CompletedProcess[str]:
        return velo_text(store, "--json", *args)

    assert velo("ingest", src, "--name", "t").returncode == 0
    script = f"head -c 5000000 /dev/zero | tr '\\0' x > {at}/big && echo y > {at}/a"
    run = velo("run", "t", "--at", at, "--", "sh", "-c", script)
    listed = json.loads(velo("sessions").stdout)
    _libc.mount(None, mnt, None, _libc.MS_REMOUNT, "size=32m")
    resumed = velo("harvest", "--resume", listed[0]["id"])
    got = os.path.join(base, "got")
    checkout = velo("checkout", "t", got)
    with open(os.path.join(got, "big"), "rb") as f:
        big = f.read()
    return {
        "run": (run.returncode, run.stdout),
        "sessions": [(s["id"], s["state"]) for s in listed],
        "resumed": (resumed.returncode, resumed.stderr),
        "checkout": checkout.returncode,
        "big": big == b"x" * 5_000_000,
        "a": open(os.path.join(got, "a")).read(),
    }


@pytest.mark.needs("overlay_root")
def test_a_harvest_that_fills_the_store_says_how_to_resume(shm_tmp: str) -> None:
    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    r = ns.run_in_child(_harvest_on_a_full_disk, shm_tmp)
    rc, stdout = r["run"]
    err = json.loads(stdout)
    [(sid, shown)] = r["sessions"]
    assert rc == 1 and err["reason"] == "store-full", stdout
    # not "retry" (that would run the command again): resume this session, whose work is kept
    assert f"veloverlay harvest --resume {sid}" in err["hint"], err
    assert "retry" not in err["hint"] and sid in err["error"], err
    assert shown == "dead-unharvested"
    assert r["resumed"][0] == 0, r["resumed"]
    assert r["checkout"] == 0 and r["big"] and r["a"] == "y\n"


def _delete_pulled_ref_on_a_full_disk(base: str) -> dict[str, object]:
    from veloverlay.remote.state import Versions
    from veloverlay.verbs.repo import Repo

    mnt = private_tmpfs(base, "3m")
    store = os.path.join(mnt, "store")
    src = os.path.join(base, "src")
    os.makedirs(src)
    for i in range(5):
        with open(os.path.join(src, f"f{i}"), "wb") as f:
            f.write(os.urandom(50_000))
    out: dict[str, object] = {}
    ingested = velo_text(store, "ingest", src, "--name", "t", env={"VELO_RUNTIME_DIR": "off"})
    out["ingest"] = ingested.returncode
    repo = Repo.open(store)
    try:  # as a pull from this registry would have noted it
        Versions(repo.store).set("reg.example:5000", "t", "team/t", "sha256:" + "0" * 64, None)
        Versions(repo.store).set("reg.example:5000", "u", "team/u", "sha256:" + "1" * 64, None)
    finally:
        repo.close()
    with open(os.path.join(mnt, "filler"), "wb") as f:  # the rest of the disk
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            out["filler"] = exc.errno
    repo = Repo.open(store)
    try:
        try:
            Versions(repo.store).forget("t")  # what `refs --delete t` does before its commit
            out["forget"] = "ok"
        except Exception as exc:  # noqa: BLE001 - the result under test
            out["forget"] = repr(exc)
        out["notes"] = Versions(repo.store).load()
    finally:
        repo.close()
    return out


def test_a_pulled_refs_notes_are_forgotten_on_a_full_disk(shm_tmp: str) -> None:
    """Deleting a ref first forgets what pulls noted of it (remote-v1/versions-v1.json), so
    that a ref made later under that name is not taken for the pulled one. On a full disk the
    notes could not be written anew (store-full), which stopped the delete before LMDB was even
    asked; they shrink in place there now, the other refs' notes kept."""
    import errno

    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_delete_pulled_ref_on_a_full_disk, shm_tmp)
    assert out["ingest"] == 0 and out["filler"] == errno.ENOSPC, out
    assert out["forget"] == "ok", out
    u = ["team/u", "sha256:" + "1" * 64, None, None]  # (the lineage and head it was given)
    assert out["notes"] == {"reg.example:5000": {"u": u}}


def _delete_refs_on_a_full_disk(base: str) -> dict[str, object]:

    mnt = private_tmpfs(base, "3m")
    store = os.path.join(mnt, "store")

    def velo(*args: str) -> subprocess.CompletedProcess[str]:
        return velo_text(store, "--json", *args, env={"VELO_RUNTIME_DIR": "off"})

    src = os.path.join(base, "src")
    os.makedirs(src)
    for i in range(10):
        with open(os.path.join(src, f"f{i}"), "wb") as f:
            f.write(os.urandom(100_000))
    out: dict[str, object] = {}
    out["ingest"] = [velo("ingest", src, "--name", n).returncode for n in ("a", "b")]
    out["filler"] = fill(os.path.join(mnt, "filler"))
    for name in ("a", "b"):
        res = velo("refs", "--delete", name)
        out[f"delete {name}"] = (res.returncode, res.stderr)
    res = velo("gc", "--grace", "0")
    out["gc"] = (res.returncode, res.stderr)
    out["refs"] = velo("refs").stdout
    out["free"] = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    reserve = os.path.join(store, "space-reserve")
    out["reserve"] = os.stat(reserve).st_blocks * 512 if os.path.exists(reserve) else None
    out["fsck"] = velo("fsck").returncode
    os.unlink(os.path.join(mnt, "filler"))
    out["again"] = velo("ingest", src, "--name", "c").returncode
    out["checkout"] = velo("checkout", "c", os.path.join(base, "out")).returncode
    out["same"] = all(
        open(os.path.join(src, n), "rb").read() == open(os.path.join(base, "out", n), "rb").read()
        for n in os.listdir(src)
    )
    return out


def test_refs_can_be_deleted_on_a_full_disk(shm_tmp: str) -> None:
    """The documented way out of a full disk is to delete refs, then gc. But LMDB copies the
    pages a deletion changes, so on a disk with no free page `refs --delete` failed inside LMDB
    (store-full, nothing committed): a user who filled the disk could not free it (found by
    filling a small tmpfs). The store keeps a small reserve that only its space-freeing commits
    give up (store/reserve.py): the deletes commit, gc frees the objects, the reserve is whole
    again, and the store is whole."""
    import errno

    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_delete_refs_on_a_full_disk, shm_tmp)
    assert out["ingest"] == [0, 0] and out["filler"] == errno.ENOSPC, out
    assert out["delete a"] == (0, ""), out
    assert out["delete b"] == (0, ""), out
    assert out["gc"][0] == 0, out  # type: ignore[index]
    assert json.loads(out["refs"]) == [], out  # type: ignore[arg-type]
    assert out["free"] >= 900_000, out  # the refs' 1 MB is free again, the reserve kept
    assert out["reserve"] == 256 << 10
    assert out["fsck"] == out["again"] == out["checkout"] == 0, out
    assert out["same"]
