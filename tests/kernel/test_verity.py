"""fs-verity (veloverlay/verity.py) and the store's use of it: objects the kernel keeps immutable.

Where the kernel and the filesystem have fs-verity (the matrix box deb13-verity: an ext4 made with
`-O verity` under the temp dir), the tests marked `needs("fsverity")` run for real, as root and as
the unprivileged uid; elsewhere they skip with the probe's reason (and fail where
VELO_TEST_MUST_WORK names fsverity). The measured digest is compared with an independent
computation of the fs-verity file digest from the kernel's documentation
(Documentation/filesystems/fsverity.rst: Merkle tree of SHA-256 over 4096-byte blocks, then the
SHA-256 of the 256-byte fsverity_descriptor), never with the product's own output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from tests.helpers.trees import assert_same_tree, force_rmtree, make_tree
from tests.helpers.unpriv import UNPRIV_GID, UNPRIV_UID, run_unprivileged
from veloverlay import _libc, fsflags, verity
from veloverlay.errors import SysError
from veloverlay.store.cas import Store
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.fsck import fsck
from veloverlay.verbs.repo import Repo

_BLOCK = 4096


def fsverity_digest(data: bytes) -> bytes:
    """The fs-verity file digest of `data` (sha256, 4096-byte blocks, no salt), per the kernel's
    documentation — written from the spec, independent of the product."""
    if data:
        level = [
            hashlib.sha256(data[i : i + _BLOCK].ljust(_BLOCK, b"\0")).digest()
            for i in range(0, len(data), _BLOCK)
        ]
        while len(level) > 1:
            joined = b"".join(level)
            level = [
                hashlib.sha256(joined[i : i + _BLOCK].ljust(_BLOCK, b"\0")).digest()
                for i in range(0, len(joined), _BLOCK)
            ]
        root = level[0]
    else:
        root = b"\0" * 32
    descriptor = struct.pack("<BBBBIQ64s32s144s", 1, 1, 12, 0, 0, len(data), root, b"", b"")
    assert len(descriptor) == 256
    return hashlib.sha256(descriptor).digest()


@contextlib.contextmanager
def verity_dir() -> Iterator[str]:
    """A 0755 directory of the unprivileged uid under the temp dir (where the probe tried
    fs-verity; the matrix box mounts its verity ext4 there)."""
    path = tempfile.mkdtemp(prefix="velo-verity-")
    try:
        if os.getuid() == 0:
            os.chown(path, UNPRIV_UID, UNPRIV_GID)
        os.chmod(path, 0o755)
        yield path
    finally:
        force_rmtree(path)


# -- everywhere ------------------------------------------------------------------------------
def test_constants_match_the_headers() -> None:
    # <linux/fsverity.h>: _IOW('f', 133, 128-byte arg), _IOWR('f', 134, 4-byte header);
    # <linux/fs.h>: FS_VERITY_FL
    assert (1 << 30) | (128 << 16) | (ord("f") << 8) | 133 == _libc.FS_IOC_ENABLE_VERITY
    assert (3 << 30) | (4 << 16) | (ord("f") << 8) | 134 == _libc.FS_IOC_MEASURE_VERITY
    assert verity.FS_VERITY_FL == 0x00100000


def test_reference_digest_matches_fsverity_utils() -> None:
    # `fsverity digest --hash-alg=sha256 --block-size=4096` (fsverity-utils 1.5, Debian's
    # `fsverity` package) of these inputs: the reference computation above is itself checked.
    assert fsverity_digest(b"").hex() == (
        "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
    )
    assert fsverity_digest(b"abc").hex() == (
        "700b6bd8510f0b4f9bac8b9cf0459151a1c4a99f467892bb4bd289a67df8e19c"
    )
    # 600001 bytes: 147 data blocks, so a two-level tree
    import random

    big = random.Random(7).randbytes(600001)
    assert fsverity_digest(big).hex() == (
        "254b96faee9b145fe7f1a8d428feb864d9e3e51964fe6ab5c6cec5aede4f2dfd"
    )


def test_usable_under_tries_and_says_why(tmp_path: os.PathLike[str]) -> None:
    ok, reason = verity.usable_under(tmp_path)
    assert reason and os.fspath(tmp_path) not in reason  # doctor's answer must be stable
    if not ok:  # this machine's kernel: ENOTSUP, and the reason says what would help
        assert "FS_IOC_ENABLE_VERITY" in reason and ": E" in reason, reason
    assert os.listdir(tmp_path) == []  # the scratch file is gone either way


def test_plain_file_is_not_sealed(tmp_path: os.PathLike[str]) -> None:
    p = os.path.join(tmp_path, "f")
    with open(p, "wb") as f:
        f.write(b"x")
    assert not verity.is_enabled(p)
    with pytest.raises(SysError) as exc:
        verity.measure(p)
    # no verity on this file (ENODATA), or none on this filesystem/kernel at all
    assert exc.value.errno in (errno.ENODATA, errno.ENOTTY, errno.EOPNOTSUPP), exc.value
    assert exc.value.filename == p


# -- where fs-verity works -------------------------------------------------------------------
def _seal_as_owner(d: str) -> dict[str, object]:
    out: dict[str, object] = {}
    data = os.urandom(3 * _BLOCK + 123)
    p = os.path.join(d, "obj")
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, 0o444)  # like an object: the kernel wants write permission, seal lends it
    out["first"] = verity.seal(p)
    out["again"] = verity.seal(p)
    out["enabled"] = verity.is_enabled(p)
    out["mode"] = stat.S_IMODE(os.stat(p).st_mode)
    out["measured"] = verity.measure(p)
    out["expected"] = fsverity_digest(data)
    os.chmod(p, 0o644)  # the owner may chmod: metadata, not content
    attempts = {
        "open-write": lambda: os.close(os.open(p, os.O_WRONLY)),
        "open-append": lambda: os.close(os.open(p, os.O_WRONLY | os.O_APPEND)),
        "open-rdwr": lambda: os.close(os.open(p, os.O_RDWR)),
        "open-trunc": lambda: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
        "truncate": lambda: os.truncate(p, 1),
    }
    for name, fn in attempts.items():
        try:
            fn()
            out[name] = "ok"
        except OSError as exc:
            out[name] = errno.errorcode[exc.errno or 0]
    with open(p, "rb") as f:
        out["same"] = f.read() == data
    os.rename(p, p + ".moved")  # names are not protected: only content
    os.unlink(p + ".moved")
    return out


@pytest.mark.needs("fsverity")
@pytest.mark.parametrize("who", ["root", "rootfree"])
def test_seal_makes_the_content_immutable_for_its_owner(who: str) -> None:
    with verity_dir() as d:
        out = _seal_as_owner(d) if who == "root" else run_unprivileged(_seal_as_owner, d)
    assert out["first"] is True and out["again"] is False
    assert out["enabled"] is True
    assert out["mode"] == 0o444  # the mode seal lent is given back
    assert out["measured"] == out["expected"]
    for name in ("open-write", "open-append", "open-rdwr", "open-trunc", "truncate"):
        assert out[name] == "EPERM", (name, out)
    assert out["same"] is True


def _store_scenario(d: str) -> dict[str, object]:
    src = os.path.join(d, "src")
    files = {
        "a.txt": b"alpha\n",
        "dir/b.bin": os.urandom(70000),
        "dir/empty": b"",
        "dir/sub/c": b"c" * 5000,
    }
    make_tree(src, dict(files))
    repo = Repo.open(os.path.join(d, "store"), create=True)
    out: dict[str, object] = {"usable": repo.store.verity()}
    try:
        from veloverlay.ingest import ingest

        ingest(repo.store, repo.m, src, "t", jobs=1)
        objs = sorted(repo.store.iter_objects())
        out["objects"] = len(objs)
        out["sealed"] = [verity.is_enabled(p) for _n, p in objs]
        out["digests_ok"] = all(
            verity.measure(p) == fsverity_digest(p.read_bytes()) for _n, p in objs
        )
        writes = {}
        refused = set()
        for name, path in objs:
            if os.geteuid() == 0:
                # Real root makes every object +i when it is named: not even its chmod goes
                # through. Lifted here so that what follows shows fs-verity alone.
                try:
                    os.chmod(path, 0o644)
                except OSError as exc:
                    refused.add(errno.errorcode[exc.errno or 0])
                else:
                    refused.add("ok")
                fsflags.set_immutable(os.fspath(path), False)
            os.chmod(path, 0o644)  # the user's chmod u+w succeeds ...
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # ... the write does not
            except OSError as exc:
                writes[name] = errno.errorcode[exc.errno or 0]
            else:
                os.write(fd, b"EVIL")
                os.close(fd)
                writes[name] = "ok"
        out["writes"] = writes
        out["chmod_refused"] = sorted(refused)
        out["real_root"] = os.geteuid() == 0
        out["immutable_at_naming"] = out["real_root"] and fsflags.may_set_immutable()
        out["names_ok"] = all(hash_bytes(p.read_bytes()).hex() == n for n, p in objs)
        rep = fsck(repo.store, repo.m, jobs=1)
        out["fsck"] = sorted({f.kind for f in rep.findings})
        rep = fsck(repo.store, repo.m, jobs=1, repair=True)
        out["after_repair"] = [f.kind for f in rep.findings]
        out["modes"] = sorted({stat.S_IMODE(os.stat(p).st_mode) for _n, p in objs})
        quick = fsck(repo.store, repo.m, jobs=1, quick=True)
        out["quick"] = (quick.ok, quick.sealed, quick.unsealed)
        got = os.path.join(d, "got")
        repo.checkout("t", got)
        out["checkout_writable"] = all(
            os.access(os.path.join(got, rel), os.W_OK) for rel in files if rel != "dir/empty"
        )
        assert_same_tree(src, got)
    finally:
        repo.close()
    return out


@pytest.mark.needs("fsverity")
@pytest.mark.parametrize("who", ["root", "rootfree"])
def test_objects_are_sealed_and_a_chmod_then_write_fails(who: str) -> None:
    with verity_dir() as d:
        out = _store_scenario(d) if who == "root" else run_unprivileged(_store_scenario, d)
    assert out["usable"][0] is True, out["usable"]  # type: ignore[index]
    assert out["objects"] == 4
    assert out["sealed"] == [True] * 4
    assert out["digests_ok"] is True
    writes = out["writes"]
    assert isinstance(writes, dict) and set(writes.values()) == {"EPERM"}, writes
    # As real root (who="root" in the root half), +i refused the chmod itself.
    want = ["EPERM"] if out["immutable_at_naming"] else ["ok"] if out["real_root"] else []
    assert out["chmod_refused"] == want, out
    assert out["names_ok"] is True
    assert out["fsck"] == ["object-writable"]  # the chmod is seen; the content never changed
    assert out["after_repair"] == [] and out["modes"] == [0o444]
    assert out["quick"] == (True, 4, 0)
    assert out["checkout_writable"] is True  # a checkout is the user's own, writable copy


def _upgrade_scenario(d: str) -> dict[str, object]:
    Repo.open(os.path.join(d, "store"), create=True).close()  # a store and its (empty) db
    store = Store.open(os.path.join(d, "store"))
    store._verity = (False, "as if named before fs-verity was there")  # noqa: SLF001
    with store.stage() as stage:
        digests = [stage.add_bytes(b"old object %d\n" % i) for i in range(3)]
        stage.publish()
    repo = Repo.open(os.fspath(store.root))
    try:
        before = fsck(repo.store, repo.m, jobs=1)
        fixed = fsck(repo.store, repo.m, jobs=1, repair=True)
        after = fsck(repo.store, repo.m, jobs=1)
        sealed = [verity.is_enabled(repo.store.object_path(dg)) for dg in digests]
    finally:
        repo.close()
    return {
        "before": (before.ok, before.sealed, before.unsealed),
        "fixed": (fixed.ok, fixed.repaired),
        "after": (after.ok, after.sealed, after.unsealed),
        "sealed": sealed,
    }


@pytest.mark.needs("fsverity")
@pytest.mark.parametrize("who", ["root", "rootfree"])
def test_fsck_repair_seals_objects_named_before(who: str) -> None:
    with verity_dir() as d:
        out = _upgrade_scenario(d) if who == "root" else run_unprivileged(_upgrade_scenario, d)
    assert out["before"] == (True, 0, 3)  # unsealed is counted, not a problem
    assert out["fixed"] == (True, 3)
    assert out["after"] == (True, 3, 0)
    assert out["sealed"] == [True, True, True]


def _doctor(d: str) -> dict[str, object]:
    store = os.path.join(d, "store")
    Store.init(store)
    out = subprocess.run(
        [sys.executable, "-m", "veloverlay", "--store", store, "doctor", "--json"],
        capture_output=True,
        check=True,
        env={**os.environ, "NO_COLOR": "1"},
    ).stdout
    report: dict[str, object] = json.loads(out)
    return report


@pytest.mark.needs("fsverity")
@pytest.mark.parametrize("who", ["root", "rootfree"])
def test_doctor_says_writes_are_prevented(who: str) -> None:
    with verity_dir() as d:
        report = _doctor(d) if who == "root" else run_unprivileged(_doctor, d)
    store = report["store"]
    chosen = report["chosen"]
    assert isinstance(store, dict) and isinstance(chosen, dict)
    assert store["fsverity"]["ok"] is True, store
    assert chosen["protection"].startswith("prevented (fs-verity on every object"), chosen
