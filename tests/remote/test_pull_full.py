"""A pull into a store whose filesystem is full: store-full (machine-readable, `--json`), never a
generic OS error, with nothing stored or moved; once there is room the same pull works."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import velo
from tests.helpers.fulldisk import fill, private_tmpfs
from tests.remote.fake_registry import FakeRegistry, file_entry, one_dir
from veloverlay.store import tree
from veloverlay.store.digest import hash_bytes


def _pull_on_a_full_disk(base: str, remote: str) -> dict[str, object]:

    mnt = private_tmpfs(base, "3m")
    store = os.path.join(mnt, "store")
    out: dict[str, object] = {"init": velo(store, "--json", "init").returncode}
    filler = os.path.join(mnt, "filler")
    out["filler"] = fill(filler)
    res = velo(store, "--json", "pull", remote)
    out["pull"] = (res.returncode, res.stdout.decode(), res.stderr.decode())
    out["refs"] = velo(store, "--json", "refs").stdout.decode()
    out["tmp"] = os.listdir(os.path.join(store, "tmp"))
    os.unlink(filler)
    again = velo(store, "--json", "pull", remote)
    out["again"] = (again.returncode, again.stderr.decode())
    out["cat"] = velo(store, "--json", "cat", "env", "s/f").stdout.decode()
    out["fsck"] = velo(store, "--json", "fsck").returncode
    return out


@pytest.mark.parametrize("full_at", ["node-packs", "objects"])
def test_a_pull_that_fills_the_disk_is_store_full(
    fake: FakeRegistry, shm_tmp: str, full_at: str
) -> None:
    """The node packs a pull walks wait in an unnamed file in the store's tmp/; a full disk
    there was a raw OSError (`reason: os-error`, "No space left on device") instead of
    store-full (found by pulling into a filled tmpfs). Objects that do not fit say so too."""
    import errno

    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    big = os.urandom(1 << 20) if full_at == "objects" else b""
    sub, nodes = one_dir([file_entry(b"f", b"pulled\n"), file_entry(b"g", big)])
    junk = {os.urandom(32): os.urandom(1 << 20)} if full_at == "node-packs" else {}
    root, top = one_dir([tree.Entry(b"s", tree.Kind.DIR, digest=sub)])
    fake.serve_version(
        {},
        {hash_bytes(b"pulled\n"): b"pulled\n", hash_bytes(big): big},
        root,
        tag="v1",
        config={"ref": "env"},
        node_packs=[{**nodes, **junk}, top],
    )
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_pull_on_a_full_disk, shm_tmp, fake.remote())
    assert out["init"] == 0 and out["filler"] == errno.ENOSPC, out
    rc, stdout, stderr = out["pull"]  # type: ignore[misc]
    assert rc == 1 and "Traceback" not in stderr, out
    assert json.loads(stdout)["reason"] == "store-full", out
    assert json.loads(out["refs"]) == [] and out["tmp"] == [], out  # type: ignore[arg-type]
    assert out["again"][0] == 0, out["again"]  # type: ignore[index]
    assert out["fsck"] == 0, out
    assert out["cat"] == "pulled\n", out


def _sha_map_on_a_full_disk(base: str) -> dict[str, object]:
    from veloverlay.remote.state import ShaMap
    from veloverlay.verbs.repo import Repo

    mnt = private_tmpfs(base, "2m")
    repo = Repo.open(os.path.join(mnt, "store"), create=True)
    out: dict[str, object] = {"filler": fill(os.path.join(mnt, "filler"))}
    pair = {b"\1" * 32: "sha256:" + "2" * 64}
    try:
        ShaMap(repo.store).add(pair)
        out["add"] = "ok"
    except Exception as exc:  # noqa: BLE001 - the result under test
        out["add"] = repr(exc)
    os.unlink(os.path.join(mnt, "filler"))
    ShaMap(repo.store).add(pair)
    out["kept"] = ShaMap(repo.store).get(b"\1" * 32)
    repo.close()
    return out


def test_the_sha256_map_is_not_what_fails_a_pull_on_a_full_disk(shm_tmp: str) -> None:
    """A pull notes each large object's sha256 in remote-v1/sha256-v1 once it is stored; on a
    full disk the append was a raw OSError (os-error) after the object itself was stored. The
    map only spares a later push a re-hash: it is left as it is there, and written later."""
    import errno

    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_sha_map_on_a_full_disk, shm_tmp)
    assert out["filler"] == errno.ENOSPC and out["add"] == "ok", out
    assert out["kept"] == "sha256:" + "2" * 64


def _push_on_a_full_disk(base: str, remote: str) -> dict[str, object]:
    mnt = private_tmpfs(base, "3m")
    store = os.path.join(mnt, "store")
    src = os.path.join(base, "src")
    os.makedirs(src)
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"pushed\n")
    out: dict[str, object] = {"ingest": velo(store, "ingest", src, "--name", "env").returncode}
    out["filler"] = fill(os.path.join(mnt, "filler"))
    res = velo(store, "--json", "push", "env", remote)
    out["push"] = (res.returncode, res.stdout.decode(), res.stderr.decode())
    text = velo(store, "push", "env", remote)
    out["text"] = (text.returncode, text.stderr.decode())
    return out


def test_a_push_from_a_full_store_is_a_push(fake: FakeRegistry, shm_tmp: str) -> None:
    """A push notes the version it pushed in the store (remote-v1/versions-v1.json) after the
    registry took its tag. From a store on a full disk that note failed (store-full) and the
    push said it failed, while the registry held the tag. The note is left out there (`noted`:
    false, a warning), and the push reports what it did."""
    import errno

    from veloverlay import ns

    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as root")
    os.makedirs(os.path.join(shm_tmp, "mnt"))
    out = ns.run_in_child(_push_on_a_full_disk, shm_tmp, fake.remote("v1"))
    assert out["ingest"] == 0 and out["filler"] == errno.ENOSPC, out
    rc, stdout, stderr = out["push"]  # type: ignore[misc]
    assert rc == 0 and "Traceback" not in stderr, out
    [res] = json.loads(stdout)
    assert res["noted"] is False and res["digest"].startswith("sha256:"), res
    assert "v1" in fake.manifests  # the registry holds what the push reported
    rc, stderr = out["text"]  # type: ignore[misc]
    assert rc == 0 and "warning:" in stderr and "--force" in stderr, out
