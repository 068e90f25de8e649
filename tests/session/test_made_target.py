"""A target directory a session made (`run --at NEW`) goes when the session ends, with either
backend; one that existed before stays, as it was.

The shim backend removed the directory it made; the overlay backend left an empty directory
behind after every `run --at NEW` (found by running the same `run --at` with both backends and
listing the parent afterwards). Both now remove only what the session made, only while it is
empty, and leave an existing target as they found it.
"""

from __future__ import annotations

import os
import shutil
import stat
from typing import Any

import pytest

from tests.helpers.trees import assert_same_tree
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, mode_params, new_store, run_session
from tests.shim._util import run_shim
from veloverlay.errors import Reason, VeloError

CASES = [*mode_params("root", "rootfree"), pytest.param("shim", id="shim")]


def _scenario(base: str, backend: str, existing: bool) -> dict[str, Any]:
    store, src = new_store(base)
    parent = os.path.join(base, "parent")
    os.mkdir(parent)
    target = os.path.join(parent, "proj")
    if existing:
        os.mkdir(target, 0o750)
    argv = ["sh", "-c", f"cd {target} && echo new > added"]
    if backend == "shim":
        run_shim(store, "t", argv, link=False, at=target)
    else:
        run_session(store, ["t"], argv, at=target, backend="overlay")
    left = {n: stat.S_IMODE(os.lstat(os.path.join(parent, n)).st_mode) for n in os.listdir(parent)}
    inside = os.listdir(target) if existing else None
    # what the session committed, against the source tree with the command's change made to it
    want = os.path.join(base, "want")
    shutil.copytree(src, want, symlinks=True)
    with open(os.path.join(want, "added"), "w") as f:
        f.write("new\n")
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    assert_same_tree(want, got, mtimes=False, dir_mtimes=False)
    return {"left": left, "inside": inside}


@pytest.mark.parametrize("mode", CASES)
def test_a_target_the_session_made_is_removed_with_it(mode: str) -> None:
    with unpriv_tmpdir() as base:
        backend = "shim" if mode == "shim" else "overlay"
        r = (
            _scenario(base, backend, False)
            if mode == "shim"
            else as_mode(mode, _scenario, base, backend, False)
        )
    assert r["left"] == {}, r  # old overlay backend: {"proj": 0o755}, an empty directory


@pytest.mark.parametrize("mode", CASES)
def test_an_existing_empty_target_stays_empty_with_its_mode(mode: str) -> None:
    with unpriv_tmpdir() as base:
        backend = "shim" if mode == "shim" else "overlay"
        r = (
            _scenario(base, backend, True)
            if mode == "shim"
            else as_mode(mode, _scenario, base, backend, True)
        )
    assert r == {"left": {"proj": 0o750}, "inside": []}, r


def _refused(base: str) -> dict[str, Any]:
    from veloverlay.session.overlay import backend

    store, _src = new_store(base)
    parent = os.path.join(base, "parent")
    os.mkdir(parent)

    def no_room(*_a: Any, **_k: Any) -> None:  # the lower layers cannot be built: a full disk
        raise VeloError("no space left while building the layers", reason=Reason.STORE_FULL)

    backend.ensure_lowers = no_room  # type: ignore[assignment]  # (a forked child: not undone)
    try:
        run_session(store, ["t"], ["true"], at=os.path.join(parent, "proj"))
        outcome = "ran"
    except VeloError as exc:
        outcome = exc.reason.value
    return {"outcome": outcome, "left": os.listdir(parent)}


@pytest.mark.parametrize("mode", mode_params("root", "rootfree"))
def test_a_target_made_for_a_session_that_cannot_start_goes_again(mode: str) -> None:
    """The target is made before the lower layers are built: a session that failed there (a full
    disk) left it behind, empty."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _refused, base)
    assert r == {"outcome": "store-full", "left": []}, r  # old: left ["proj"]
