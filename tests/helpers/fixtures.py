"""Fixtures shared by every test directory (loaded from tests/conftest.py)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.helpers.trees import force_rmtree
from tests.helpers.unpriv import mine
from veloverlay.verbs.repo import Repo


def _shm_dir(prefix: str) -> str:
    # VELO_INTERNAL__TEST_SCRATCH moves the stores elsewhere (the matrix's fs-verity box)
    base = os.environ.get("VELO_INTERNAL__TEST_SCRATCH") or (
        "/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    return mine(tempfile.mkdtemp(prefix=prefix, dir=base))


@pytest.fixture
def own_mount_namespace() -> Iterator[None]:
    """The test, and every process it starts, in a mount namespace of its own (private), left
    again at its end. Each session's start (and any `unshare -m`) copies every mount of the
    namespace it is made from: an overlay a test mounts on a host path (`veloverlay mount`) is
    then also in every namespace another test makes meanwhile, and such a copy keeps it from
    being unmounted and harvested, as the product must say (`session-active`). In the host's
    namespace, those tests failed whenever other tests started sessions at the same time. Its
    mounts go with the namespace. Root only."""
    import ctypes

    from veloverlay import _libc, mount

    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _libc.unshare(_libc.CLONE_NEWNS)
        try:
            mount.make_rprivate("/")
            yield
        finally:
            if libc.setns(home, _libc.CLONE_NEWNS) != 0:  # (setns makes / the cwd)
                why = os.strerror(ctypes.get_errno())
                pytest.exit(f"cannot leave a test's mount namespace: {why}", returncode=3)
            os.fchdir(cwd)
    finally:
        os.close(cwd)
        os.close(home)


@pytest.fixture
def shm_tmp() -> Iterator[str]:
    """A temp dir on tmpfs (fast), removed afterwards, immutable flags and all."""
    d = _shm_dir("velo-test-")
    yield d
    force_rmtree(d)


@pytest.fixture
def repo(shm_tmp: str, request: pytest.FixtureRequest) -> Iterator[Repo]:
    """A fresh store on tmpfs; fsck must pass after the test (unless it corrupts on purpose)."""
    r = Repo.open(os.path.join(shm_tmp, "store"), create=True)
    yield r
    if request.node.get_closest_marker("corrupts_store") is None:
        from veloverlay.verbs.fsck import fsck

        report = fsck(r.store, r.m, jobs=1)
        assert report.ok, f"fsck after the test: {report.findings[:5]}"
    r.close()


def sbin_which(name: str) -> str | None:
    """shutil.which, also in /usr/sbin and /sbin whatever PATH is (a test may have narrowed it)."""
    import shutil

    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=search)


def _loop_xfs(top: str) -> str:
    """A loop-mounted XFS (reflinks) of 512 MiB, sparse, at `top`/mnt; returns the mount point
    or raises RuntimeError saying why it cannot be made here."""
    import subprocess

    if os.geteuid() != 0:
        raise RuntimeError("a loop-mounted filesystem needs root")
    mkfs = sbin_which("mkfs.xfs")
    if mkfs is None:
        raise RuntimeError("mkfs.xfs not found (Debian: apt-get install xfsprogs)")
    image, mnt = os.path.join(top, "xfs.img"), os.path.join(top, "mnt")
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    for cmd in ([mkfs, "-q", "-f", "-m", "reflink=1", image], ["mount", "-o", "loop", image]):
        if cmd[0] == "mount":
            os.mkdir(mnt)
            cmd.append(mnt)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])}: {r.stderr.strip() or r.returncode}")
    return mnt


@pytest.fixture
def reflink_dir(tmp_path: str) -> Iterator[str]:
    """A directory where FICLONE works: the temp dir where the probe finds reflinks there, else
    (as root) a fresh loop-mounted XFS, unmounted and removed afterwards. Skipped with the
    reason where neither can be had; a failure when VELO_TEST_MUST_WORK names "reflink"."""
    import subprocess

    from tests.conftest import must_work
    from veloverlay import probe

    if probe.detect().feature("reflink").ok:
        yield str(tmp_path)
        return
    top = tempfile.mkdtemp(prefix="velo-test-xfs-", dir="/var/tmp")
    mnt = os.path.join(top, "mnt")
    try:
        try:
            mnt = _loop_xfs(top)
        except RuntimeError as exc:
            msg = f"reflink: not in the temp dir, and no XFS: {exc}"
            if "reflink" in must_work() or "all" in must_work():
                pytest.fail(f"VELO_TEST_MUST_WORK names 'reflink' but {msg}")
            pytest.skip(msg)
        yield mnt
    finally:
        # Its files (+i ones too) go with the image. A busy mount (a failed test's traceback
        # still holding its store open) is detached lazily.
        busy = os.path.ismount(mnt) and subprocess.run(["umount", mnt]).returncode != 0
        if busy:
            subprocess.run(["umount", "--lazy", mnt], check=True)
        force_rmtree(top)
