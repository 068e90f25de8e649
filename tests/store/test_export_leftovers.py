"""A killed export leaves `OUT.part`: the next export replaces it and works; one that a running
export holds, or that is not a killed export's own file, is refused and left as it is.

The kill is real (SIGKILL at a crash point while objects are written, see veloverlay/faults.py);
the bundle the rerun writes is checked by importing it into another store and comparing the
files with the source tree's."""

from __future__ import annotations

import fcntl
import io
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.store.test_integrity import FILES, ingested, velo
from veloverlay.store.bundle import import_bundle
from veloverlay.verbs.repo import Repo

__all__ = ["ingested"]  # the fixture, used by name


def _killed_export(store: str, out: str) -> None:
    env = {**os.environ, "VELO_STORE": store, "VELO_INTERNAL__TEST_FAULT": "export.object:2"}
    r = subprocess.run(
        [sys.executable, "-m", "veloverlay", "export", "t", "-o", out],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert os.path.isfile(out + ".part") and not os.path.lexists(out)


def _imported_files(bundle: str, store: str) -> dict[str, bytes]:
    repo = Repo.open(store, create=True)
    try:
        with open(bundle, "rb") as f:
            import_bundle(repo.store, repo.m, f)
        out = {}
        for path in FILES:
            buf = io.BytesIO()
            repo.cat("t", path, buf)
            out[path] = buf.getvalue()
        return out
    finally:
        repo.close()


def test_the_export_after_a_killed_one_works(ingested: str, shm_tmp: str) -> None:
    out = os.path.join(shm_tmp, "b.velo")
    _killed_export(ingested, out)
    res = velo(ingested, "export", "t", "-o", out)
    assert res.returncode == 0, res.stderr
    assert not os.path.lexists(out + ".part")
    assert _imported_files(out, os.path.join(shm_tmp, "dst")) == FILES


def test_a_part_file_a_running_export_holds_is_left_alone(ingested: str, shm_tmp: str) -> None:
    out = os.path.join(shm_tmp, "b.velo")
    _killed_export(ingested, out)
    with open(out + ".part", "rb") as held:
        before = os.fstat(held.fileno())
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # what an export writing it holds
        res = velo(ingested, "export", "t", "-o", out)
        assert res.returncode == 1 and "reason: exists" in res.stderr, res.stderr
        now = os.stat(out + ".part")
        assert (now.st_ino, now.st_size) == (before.st_ino, before.st_size)
        assert not os.path.lexists(out)


@pytest.mark.needs("root")
def test_a_part_file_of_another_user_is_not_taken_for_a_leftover(
    ingested: str, shm_tmp: str
) -> None:
    out = os.path.join(shm_tmp, "b.velo")
    with open(out + ".part", "wb") as f:
        f.write(b"theirs")
    os.chown(out + ".part", 1500, 1500)
    res = velo(ingested, "export", "t", "-o", out)
    assert res.returncode == 1 and "reason: exists" in res.stderr, res.stderr
    with open(out + ".part", "rb") as f:
        assert f.read() == b"theirs"
    assert not os.path.lexists(out)


def test_an_output_that_cannot_be_made_is_named_whole(ingested: str, shm_tmp: str) -> None:
    """`-o DIR/NAME` where NAME.part (or NAME) cannot be made or renamed failed with Python's
    OSError naming only 'NAME.part' relative to nothing (reason os-error), after the whole bundle
    was written in the rename's case. A 253-byte name (its .part is over 255 bytes) is now
    bad-path naming the output, and nothing is left behind."""
    out = os.path.join(shm_tmp, "b" * 253)
    res = velo(ingested, "export", "t", "-o", out)
    assert res.returncode == 1 and "reason: bad-path" in res.stderr, res.stderr
    assert json.loads(res.stdout)["path"] == out
    assert not [n for n in os.listdir(shm_tmp) if n.startswith("bbbb")]


def test_a_part_file_that_is_not_a_bundle_is_kept(ingested: str, shm_tmp: str) -> None:
    """`OUT.part` of the user's own that no export wrote (a browser's partial download of the
    same name) is not a leftover: refused, and kept byte for byte."""
    out = os.path.join(shm_tmp, "b.velo")
    with open(out + ".part", "wb") as f:
        f.write(b"half of a download")
    res = velo(ingested, "export", "t", "-o", out)
    assert res.returncode == 1
    assert json.loads(res.stdout)["reason"] == "exists"
    with open(out + ".part", "rb") as f:
        assert f.read() == b"half of a download"
    assert not os.path.lexists(out)


def _export_over(store: str, src: str, out: str) -> tuple[str, bool]:
    """As the unprivileged uid: ingest `src` into its own store, export over `out`; the error's
    reason, and whether any bundle byte was written first."""
    from veloverlay.errors import VeloError
    from veloverlay.ingest.pipeline import ingest
    from veloverlay.store import bundle

    repo = Repo.open(store, create=True)
    wrote = [False]
    real = bundle.export_bundle

    def counted(*a: object, **kw: object) -> object:
        wrote[0] = True
        return real(*a, **kw)  # type: ignore[arg-type]

    bundle.export_bundle = counted  # type: ignore[assignment]
    try:
        ingest(repo.store, repo.m, src, "t", jobs=1)
        bundle.export_to_path(repo.store, repo.m, "t", out)
    except VeloError as exc:
        return exc.reason.value, wrote[0]
    finally:
        repo.close()
    return "", wrote[0]


def test_another_users_file_in_a_sticky_directory_is_refused_before_writing() -> None:
    """A non-root export over another user's file in a sticky directory (/tmp) could only fail
    at the rename (EPERM), after the whole bundle was written: refused first, nothing written,
    their file as it was."""
    from tests.helpers.unpriv import run_unprivileged, unpriv_tmpdir

    with unpriv_tmpdir() as top:  # root's, 1777
        src = os.path.join(top, "src")
        os.mkdir(src)
        with open(os.path.join(src, "f"), "wb") as f:
            f.write(b"private bytes")
        os.chmod(src, 0o755)
        out = os.path.join(top, "b.velo")
        with open(out, "wb") as f:
            f.write(b"root's own file")
        reason, wrote = run_unprivileged(_export_over, os.path.join(top, "store"), src, out)
        assert (reason, wrote) == ("exists", False)
        with open(out, "rb") as f:
            assert f.read() == b"root's own file"
        assert sorted(os.listdir(top)) == ["b.velo", "src", "store"]
