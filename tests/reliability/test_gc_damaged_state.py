"""gc, the layout migration and store removal with an unfinished session whose state file does not
name its roots (damaged, or written by hand): every version writes `roots` when a session starts,
so what such a session needs is unknown. gc read a missing or unparsable `roots` as "needs
nothing": it swept the objects of the session's view once its ref was gone (the resumed harvest
then had nothing to commit), migrated the objects' layout under it, and `store remove` removed
the store without `--force`. Now each refuses with `session-active`, as for a state file that
cannot be read, and what the session had is still there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.reliability.test_gc_sessions import _files, _velo
from tests.session._util import new_store
from veloverlay import session

_ROOTS = {"missing": None, "empty": [], "not-a-root": ["zz"]}


def _set_roots(path: str, roots: list[str] | None) -> None:
    with open(path) as f:
        data = json.load(f)
    data.pop("roots")
    if roots is not None:
        data["roots"] = roots
    with open(path, "w") as f:
        json.dump(data, f)


def _reason(store: str, *args: str) -> str:
    env = {**os.environ, "VELO_STORE": store, "NO_COLOR": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "veloverlay", "--json", *args], env=env, capture_output=True
    )
    assert p.returncode != 0, p.stdout
    return str(json.loads(p.stdout or p.stderr)["reason"])


@pytest.mark.parametrize("roots", list(_ROOTS))
@pytest.mark.needs("root", "overlay_root")
def test_gc_keeps_what_a_session_with_no_roots_recorded_had(shm_tmp: str, roots: str) -> None:
    store, _src = new_store(shm_tmp)
    root = os.fspath(store.root)
    at = os.path.join(shm_tmp, "at")
    expected = dict(_files(store, "t"), **{"f1": b"session\n", "added": b"added\n"})
    script = f"echo session > {at}/f1 && echo added > {at}/added"
    rc, out = _velo(root, "run", "t", "--at", at, "--", "sh", "-c", script, fault="harvest.file:1")
    assert rc == -9, out  # its manager killed in the harvest: unfinished
    [sid] = [i.id for i in session.list_sessions(store)]
    rc, out = _velo(root, "refs", "--delete", "t")
    assert rc == 0, out
    # damaged since (`refs --delete` refuses too now: what deleting the ref frees is unknown)
    _set_roots(os.path.join(root, "sessions", sid, "state.json"), _ROOTS[roots])
    assert _reason(root, "gc", "--grace", "0") == "session-active"
    rc, out = _velo(root, "harvest", "--resume", sid)
    assert rc == 0, out
    assert _files(store, f"t@{sid}") == expected  # the source tree with the command's changes


def _old_layout_with_a_session(base: str) -> tuple[str, list[str]]:
    """A store laid out as before (objects-v1) and an unfinished session whose state names its
    refs and a layer it has mounted, but no roots; the store's object files."""
    os.makedirs(os.path.join(base, "store", "objects-v1"))
    store, _src = new_store(base)
    assert store.objects.name == "objects-v1"
    root = os.fspath(store.root)
    layer = os.path.join(root, "trees-v1", "layers", "mounted")
    os.makedirs(layer)
    sdir = os.path.join(root, "sessions", "old1")
    os.makedirs(sdir)
    with open(os.path.join(sdir, "state.json"), "w") as f:
        json.dump({"id": "old1", "state": "running", "refs": ["t"], "layers": [layer]}, f)
    objects = sorted(
        os.path.join(d, n) for d, _dirs, names in os.walk(os.path.join(root, "objects-v1"))
        for n in names
    )  # fmt: skip
    assert objects
    return root, objects


def test_the_layout_migration_waits_for_a_session_with_no_roots(shm_tmp: str) -> None:
    root, objects = _old_layout_with_a_session(shm_tmp)
    assert _reason(root, "gc", "--grace", "0") == "session-active"
    assert all(os.path.isfile(p) for p in objects)  # where the session's layers name them
    assert not os.path.exists(os.path.join(root, "objects-v2"))
    assert os.path.isdir(os.path.join(root, "trees-v1", "layers", "mounted"))


def test_store_remove_refuses_with_a_session_with_no_roots(shm_tmp: str) -> None:
    root, objects = _old_layout_with_a_session(shm_tmp)
    assert _reason(root, "remove-store", "--yes") == "session-active"
    assert all(os.path.isfile(p) for p in objects)
