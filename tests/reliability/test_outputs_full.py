"""`checkout` and `export -o` onto a full disk: a clear `store-full` (no space left) naming the
destination, nothing partial left beside it, and the next run, once there is room, works."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.fulldisk import private_tmpfs
from tests.helpers.trees import assert_same_tree


def _onto_a_full_disk(base: str) -> dict[str, object]:
    from veloverlay import _libc, mount

    mnt = private_tmpfs(base, "3m")
    disk = os.path.join(base, "disk")  # a mount point as DEST: written into, not replaced
    mount.mount_tmpfs(disk, "size=3m")
    store = os.path.join(base, "store")

    def velo(*args: str) -> tuple[int, dict[str, object] | None]:
        p = velo_text(store, "--json", *args)
        return p.returncode, (json.loads(p.stdout) if p.returncode else None)

    out: dict[str, object] = {}
    out["ingest"] = velo("ingest", os.path.join(base, "src"), "--name", "big")[0]
    os.mkdir(os.path.join(mnt, "empty"))
    for what, args in (
        ("checkout", ["checkout", "big", os.path.join(mnt, "new")]),
        ("checkout-empty", ["checkout", "big", os.path.join(mnt, "empty")]),
        ("export", ["export", "big", "-o", os.path.join(mnt, "big.velo")]),
        ("checkout-mount", ["checkout", "big", disk]),
    ):
        out[what] = velo(*args)
    out["left"] = sorted(os.listdir(mnt)), os.listdir(os.path.join(mnt, "empty"))
    out["left on the disk"] = os.listdir(disk)
    _libc.mount(None, mnt, None, _libc.MS_REMOUNT, "size=32m")
    _libc.mount(None, disk, None, _libc.MS_REMOUNT, "size=32m")
    out["again"] = [
        velo("checkout", "big", os.path.join(mnt, "new"))[0],
        velo("checkout", "big", os.path.join(mnt, "empty"))[0],
        velo("export", "big", "-o", os.path.join(mnt, "big.velo"))[0],
        velo("import", os.path.join(mnt, "big.velo"), "--name", "back")[0],
        velo("checkout", "back", os.path.join(base, "back"))[0],
        velo("checkout", "big", disk)[0],
    ]
    assert_same_tree(os.path.join(base, "src"), disk)
    assert_same_tree(os.path.join(base, "src"), os.path.join(mnt, "new"))
    assert_same_tree(os.path.join(base, "src"), os.path.join(mnt, "empty"))
    out["after"] = sorted(os.listdir(mnt))
    return out


def test_checkout_and_export_onto_a_full_disk(shm_tmp: str) -> None:
    """Found by checking out and exporting an 8 MiB version into a 3 MiB tmpfs: checkout said
    store-full, export said `syscall` (the write's ENOSPC went past the mapping that gave
    store-full to the same error met at its fsync). A mount point as DEST is written into (it
    cannot be replaced): what the failed checkout wrote there stayed, and the rerun, once
    there was room, was refused ("not empty")."""
    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    src = os.path.join(shm_tmp, "src")
    os.makedirs(os.path.join(src, "sub"))
    for name in ("a", "b", "sub/c"):
        with open(os.path.join(src, name), "wb") as f:
            f.write(os.urandom(3_000_000))
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    os.makedirs(os.path.join(shm_tmp, "disk"))
    out = ns.run_in_child(_onto_a_full_disk, shm_tmp)
    assert out["ingest"] == 0, out
    for what in ("checkout", "checkout-empty", "export", "checkout-mount"):
        rc, err = out[what]  # type: ignore[misc]
        assert rc == 1 and err["reason"] == "store-full", (what, err)
        assert "no space left" in err["error"], (what, err)
    assert out["left"] == (["empty"], []), out  # no partial tree, no .part, DEST still empty
    assert out["left on the disk"] == [], out  # old: the files written before ENOSPC
    assert out["again"] == [0, 0, 0, 0, 0, 0], out
    assert out["after"] == ["big.velo", "empty", "new"], out
    assert_same_tree(src, os.path.join(shm_tmp, "back"))
