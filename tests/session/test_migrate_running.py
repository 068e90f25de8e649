"""gc's move of a store's objects from the old layout (`objects-v1/ab/cd/`) to the new one
(`verbs.gc.migrate_objects`) ends by evicting every cached layer (`prune(store, set())`): theirs
name the old paths. A session running then would have its layers removed under it (overlayfs
shows a lower's files vanishing: its whole tree). It cannot be: gc holds the store lock
exclusively, a session holds it shared from choosing its layers until its state file names
them, and the migration waits while any unfinished session's state names roots. Shown here with
a session running across the gc, in each lower form: nothing is migrated, its command reads its
files, and the first gc after it migrates the store."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_form_params, new_store, use_form, while_running
from veloverlay.session import state
from veloverlay.store.cas import Store


def _gc(store: str) -> dict[str, int]:
    done = velo_text(None, "--json", "--store", store, "gc", "--grace", "0", cwd="/")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _migrated_while_running(base: str, form: str) -> dict[str, object]:
    use_form(form)
    os.makedirs(os.path.join(base, "store", "objects-v1"))  # a store laid out as before
    store, _src = new_store(base)
    assert store.objects.name == "objects-v1"
    result: dict[str, object] = {}

    def gc_meanwhile() -> None:
        (st,) = list(state.iter_states(store))
        result["layers"] = [p for p in st.layers if os.path.isdir(p)]
        result["during"] = _gc(os.fspath(store.root))
        result["layers_left"] = [p for p in st.layers if os.path.isdir(p)]
        result["legacy_during"] = os.path.isdir(store.root / "objects-v1")

    ended, result["seen"], error = while_running(
        store, base, os.path.join(base, "proj"), "f1 d/b", gc_meanwhile
    )
    result["error"] = error
    result["status"] = ended if isinstance(ended, Exception) else ended.exit_status
    result["after"] = _gc(os.fspath(store.root))
    again = Store.open(os.fspath(store.root))
    result["layout_after"] = again.objects.name
    return result


@pytest.mark.parametrize(("mode", "form"), mode_form_params(store_layers=True))
def test_a_layout_migration_waits_for_a_running_session(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _migrated_while_running, base, form)
    assert r["error"] is None and r["status"] == 0, r
    assert r["seen"] == b"one\nbee\n", r  # the command read its files after the gc
    during, after = r["during"], r["after"]
    assert isinstance(during, dict) and isinstance(after, dict)
    assert during["objects_migrated"] == 0 and r["legacy_during"] is True, r
    assert r["layers"] and r["layers_left"] == r["layers"], r  # its layers all stay
    assert after["objects_migrated"] > 0 and r["layout_after"] == "objects-v2", r
