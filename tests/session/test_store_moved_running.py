"""A store moved (its directory renamed) while a session of it runs, and a session of the store
at its new path started meanwhile: that start drops the layers built for the old path
(`lower.stacks._built_here`: their Tier-1 links name objects where the store was), and it
removed the running session's layers with them: the running command's tree emptied under it
(`cat f1`: No such file or directory). Found by renaming a store under `run -- sleep` and
running a session of the new path. The layers unfinished sessions recorded stay now (by name),
and gc keeps them too though their recorded path is the old one. The running session's
manager then wrote its state by the old path, making the store's directory there again (a
symbolic link put there led root's write anywhere): a state is written only into the store
held now."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_form_params, new_store, use_form, while_running
from veloverlay.session import state


def _cli(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    return velo_text(None, "--json", "--store", store, *args, cwd="/")


def _moved_while_running(base: str, form: str) -> dict[str, object]:
    use_form(form)
    store, _src = new_store(base)
    moved = os.path.join(base, "moved")
    proj, proj2 = os.path.join(base, "proj"), os.path.join(base, "proj2")
    result: dict[str, object] = {}

    def move_and_run() -> None:
        (st,) = list(state.iter_states(store))
        result["layers"] = len(st.layers)
        os.rename(store.root, moved)
        done = _cli(moved, "run", "t", "--at", proj2, "--", "true")
        result["second"] = (done.returncode, done.stderr[-300:])
        done = _cli(moved, "gc", "--grace", "0")
        result["gc"] = (done.returncode, done.stderr[-300:])

    # Its harvest says the store moved (a VeloError, resumed below).
    _ended, result["seen"], error = while_running(store, base, proj, "f1 d/b", move_and_run)
    if error is not None:
        result["error"] = error
    result["old_path_made"] = os.path.lexists(store.root)
    done = _cli(moved, "harvest", "--all")
    result["resumed"] = done.returncode
    return result


@pytest.mark.parametrize(("mode", "form"), mode_form_params(store_layers=True))
def test_a_session_running_while_its_store_moves_keeps_its_layers(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _moved_while_running, base, form)
    assert "error" not in r and r["layers"], r
    assert r["second"][0] == 0 and r["gc"][0] == 0, r  # type: ignore[index]
    assert r["seen"] == b"one\nbee\n", r
    assert r["resumed"] == 0, r
    # the manager wrote its state where the store was: the old path made again, as its user
    assert r["old_path_made"] is False, r
