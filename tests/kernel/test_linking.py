"""Reflink / hard link / copy placement: what was done is returned, bytes always arrive."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator

import pytest

from veloverlay import linking
from veloverlay.errors import Reason, VeloError
from veloverlay.linking import LinkMode

DATA = os.urandom(3 << 20) + b"tail"


@pytest.fixture
def shm() -> Iterator[pathlib.Path]:
    # tmpfs: no reflink, so the copy chain is what runs
    path = pathlib.Path(tempfile.mkdtemp(prefix="velo-link-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def src(shm: pathlib.Path) -> pathlib.Path:
    path = shm / "src"
    path.write_bytes(DATA)
    path.chmod(0o640)
    return path


def test_the_four_modes() -> None:
    assert {m.name for m in LinkMode} == {"REFLINK", "HARDLINK", "COPY", "SYMLINK"}
    for member in LinkMode:
        assert member.value == member.name.lower()


def test_copy_when_reflink_is_impossible(shm: pathlib.Path, src: pathlib.Path) -> None:
    old = os.umask(0o077)
    try:
        used = linking.clone_or_copy(src, shm / "dst", mode=0o755)
    finally:
        os.umask(old)
    assert used is LinkMode.COPY
    assert (shm / "dst").read_bytes() == DATA
    assert stat.S_IMODE((shm / "dst").stat().st_mode) == 0o755  # exact, whatever the umask
    assert (shm / "dst").stat().st_ino != src.stat().st_ino


def test_default_mode_is_the_sources(shm: pathlib.Path, src: pathlib.Path) -> None:
    linking.clone_or_copy(src, shm / "dst")
    assert stat.S_IMODE((shm / "dst").stat().st_mode) == 0o640


def test_reflink_where_supported(reflink_dir: str) -> None:
    src = pathlib.Path(reflink_dir) / "src"
    src.write_bytes(DATA)
    assert linking.clone_or_copy(src, src.with_name("dst")) is LinkMode.REFLINK
    assert src.with_name("dst").read_bytes() == DATA


def test_copy_forbidden_raises_and_leaves_nothing(shm: pathlib.Path, src: pathlib.Path) -> None:
    with pytest.raises(VeloError) as info:
        linking.clone_or_copy(src, shm / "dst", allow_copy=False)
    assert info.value.reason is Reason.FALLBACK_FORBIDDEN
    assert not (shm / "dst").exists()


def test_destination_is_created_exclusively(shm: pathlib.Path, src: pathlib.Path) -> None:
    victim = shm / "victim"
    victim.write_bytes(b"keep me")
    (shm / "existing").write_bytes(b"old")
    (shm / "link").symlink_to(victim)
    for dst in (shm / "existing", shm / "link"):
        with pytest.raises(FileExistsError):
            linking.clone_or_copy(src, dst)
    assert victim.read_bytes() == b"keep me"
    assert (shm / "existing").read_bytes() == b"old"


def test_source_must_be_a_regular_file(shm: pathlib.Path) -> None:
    (shm / "d").mkdir()
    with pytest.raises(VeloError) as info:
        linking.clone_or_copy(shm / "d", shm / "dst")
    assert info.value.reason is Reason.SPECIAL_FILE
    (shm / "target").write_bytes(b"x")
    (shm / "sym").symlink_to(shm / "target")
    with pytest.raises(OSError) as oinfo:
        linking.clone_or_copy(shm / "sym", shm / "dst2")
    assert oinfo.value.errno == errno.ELOOP


def _refuse(err: int) -> Callable[..., int]:
    def fail(*_args: object, **_kw: object) -> int:
        raise OSError(err, os.strerror(err))

    return fail


@pytest.mark.parametrize("broken", [["copy_file_range"], ["copy_file_range", "sendfile"]])
def test_copy_falls_back_to_sendfile_then_read_write(
    shm: pathlib.Path, src: pathlib.Path, monkeypatch: pytest.MonkeyPatch, broken: list[str]
) -> None:
    for name in broken:
        monkeypatch.setattr(os, name, _refuse(errno.ENOSYS))
    assert linking.clone_or_copy(src, shm / "dst") is LinkMode.COPY
    assert (shm / "dst").read_bytes() == DATA


def test_a_real_copy_error_propagates_and_cleans_up(
    shm: pathlib.Path, src: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "copy_file_range", _refuse(errno.ENOSPC))
    with pytest.raises(OSError) as info:
        linking.clone_or_copy(src, shm / "dst")
    assert info.value.errno == errno.ENOSPC
    assert not (shm / "dst").exists()


def test_hardlink(shm: pathlib.Path, src: pathlib.Path) -> None:
    assert linking.hardlink_or_copy(src, shm / "dst") is LinkMode.HARDLINK
    assert (shm / "dst").stat().st_ino == src.stat().st_ino


@pytest.mark.parametrize("err", [errno.EMLINK, errno.EXDEV, errno.EPERM])
def test_hardlink_falls_back_to_copy(
    shm: pathlib.Path, src: pathlib.Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    # EMLINK: ext4 stops at 65,000 links per inode; simulated here
    monkeypatch.setattr(os, "link", _refuse(err))
    assert linking.hardlink_or_copy(src, shm / "dst") is LinkMode.COPY
    assert (shm / "dst").read_bytes() == DATA
    assert (shm / "dst").stat().st_ino != src.stat().st_ino


def test_hardlink_fallback_can_be_forbidden(
    shm: pathlib.Path, src: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "link", _refuse(errno.EMLINK))
    with pytest.raises(VeloError) as info:
        linking.hardlink_or_copy(src, shm / "dst", allow_copy=False)
    assert info.value.reason is Reason.FALLBACK_FORBIDDEN


def test_other_link_errors_propagate(shm: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError):
        linking.hardlink_or_copy(shm / "missing", shm / "dst")
