"""Cached stacks carry the format of their layers (`lower.stacks.STACK_FORMAT`).

A stack had no format number: one built by older code was reused as it was on the warm path,
whatever its layers held. Now a stack of another format is built again, beside the old layers;
the rebuilt stack no longer names them, so gc must keep them as long as an unfinished session
recorded them (its state's `layers`): overlayfs shows a lower's files vanishing under a running
session. Found by reading `_read_stack` and `prune._prune_home` side by side."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers.cli import TOP
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import (
    as_mode,
    head_root,
    mode_form_params,
    new_store,
    use_form,
    while_running,
)
from veloverlay.lower import stacks
from veloverlay.session import state
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests

_UPGRADED = (
    "import runpy, sys; from veloverlay.lower import stacks; "
    "stacks.STACK_FORMAT = getattr(stacks, 'STACK_FORMAT', 1) + 1; "
    "sys.argv[0] = 'veloverlay'; runpy.run_module('veloverlay', run_name='__main__')"
)


def _cli(store: Store, *args: str, upgraded: bool = False, check: bool = True) -> str:
    """`veloverlay --json ARGS` in a process of its own (`upgraded`: by code whose stack format
    is the next one); its stdout."""
    env = {**os.environ, "PYTHONPATH": TOP, "NO_COLOR": "1"}
    how = ["-c", _UPGRADED] if upgraded else ["-m", "veloverlay"]
    cmd = [sys.executable, *how, "--json", "--store", os.fspath(store.root), *args]
    done = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 or not check, (cmd, done.stdout, done.stderr)
    return done.stdout


def _stacked(home: str) -> set[str]:
    """The layers the stacks of a home name, as paths."""
    out = set()
    for name in os.listdir(os.path.join(home, "stacks")):
        with open(os.path.join(home, "stacks", name)) as f:
            out |= {os.path.join(home, "layers", n) for n in json.load(f)["layers"]}
    return out


def _across_a_rebuild(base: str, form: str, cleaner: str) -> dict[str, object]:

    use_form(form)
    store, _src = new_store(base)
    proj, proj2 = os.path.join(base, "proj"), os.path.join(base, "proj2")
    result: dict[str, object] = {}

    def rebuild_and_clean() -> None:
        """Once the command runs inside its projection: the next session's rebuild, a gc."""
        (st,) = list(state.iter_states(store))
        result["old"] = old = set(st.layers)
        home = os.path.dirname(os.path.dirname(st.layers[0]))
        result["before"] = _stacked(home)
        # the next session, by upgraded code, then a gc: while this one still runs
        _cli(store, "run", "t", "--at", proj2, "--", "true", upgraded=True)
        result["new"] = _stacked(home)
        if cleaner == "gc":
            evicted = json.loads(_cli(store, "gc"))["layers_evicted"]
        else:  # a damaged stack record, dropped by fsck --repair with the unused layers
            with open(os.path.join(home, "stacks", "junk.json"), "w") as f:
                f.write("{")
            _cli(store, "fsck", "--repair", check=False)
            evicted = int(os.path.exists(os.path.join(home, "stacks", "junk.json")))
        result["evicted_running"] = evicted
        result["kept_running"] = sorted(p for p in old if os.path.isdir(p))

    ended, seen, error = while_running(store, base, proj, "f1 d/b", rebuild_and_clean)
    if isinstance(ended, Exception):
        raise ended
    status = ended.exit_status
    if error is not None:
        result["error"] = error
    assert "new" in result, result
    old, before, new = result.pop("old"), result.pop("before"), result.pop("new")
    assert isinstance(old, set) and isinstance(new, set)
    evicted_after = json.loads(_cli(store, "gc"))["layers_evicted"]
    return {
        **result,
        "status": status,
        "old": sorted(old),
        "old_stacked": old <= before,  # type: ignore[operator]
        "new_differs": not new & old,
        "seen": seen,
        "old_left": sorted(p for p in old if os.path.exists(p)),
        "new_left": all(os.path.isdir(p) for p in new),
        "evicted_after": evicted_after,
    }


@pytest.mark.parametrize("cleaner", ["gc", "fsck"])
@pytest.mark.parametrize(("mode", "form"), mode_form_params(store_layers=True))
def test_a_session_running_across_a_stack_rebuild_keeps_its_layers(
    mode: str, form: str, cleaner: str
) -> None:
    """`cleaner`: gc evicting the layers no stack names, or fsck --repair dropping a damaged
    stack record (and with it every layer no other stack names)."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _across_a_rebuild, base, form, cleaner)
    assert r.get("status") == 0, r
    assert r["old_stacked"] and r["new_differs"], r  # not reused: another format
    assert r["kept_running"] == r["old"] and r["evicted_running"] == 0, r
    assert r["seen"] == b"one\nbee\n", r
    # once the session ended, its old layers go with the next gc; the rebuilt ones stay
    assert r["old_left"] == [] and r["evicted_after"] == len(r["old"]) and r["new_left"], r


def _older_stack(base: str, form: str) -> dict[str, object]:
    use_form(form)
    store, _src = new_store(base)
    root = head_root(store, "t")
    m = Manifests(store)
    try:
        first = stacks.ensure_lowers(store, m, root, form="data-only", protect=False)
        (record,) = [
            os.path.join(first.home, "stacks", n)
            for n in os.listdir(os.path.join(first.home, "stacks"))
        ]
        with open(record) as f:
            data = json.load(f)
        data.pop("format", None)  # as code before the format number wrote it
        with open(record, "w") as f:
            json.dump(data, f)
        again = stacks.ensure_lowers(store, m, root, form="data-only", protect=False)
        warm = stacks.ensure_lowers(store, m, root, form="data-only", protect=False)
    finally:
        m.close()
    with open(record) as f:
        rewritten = json.load(f)
    return {
        "first": first.layers,
        "again": again.layers,
        "built": again.built,
        "warm": (warm.built, warm.layers == again.layers),
        "format": rewritten.get("format"),
    }


@pytest.mark.parametrize(
    ("mode", "form"),
    [p for p in mode_form_params(store_layers=True) if "links" not in p.id],
)
def test_a_stack_without_the_format_number_is_built_again(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _older_stack, base, form)
    assert r["built"] == "full" and r["again"] != r["first"], r
    assert r["warm"] == ("cached", True), r
    assert r["format"] == stacks.STACK_FORMAT, r


def _tampered(base: str, form: str, how: str) -> dict[str, object]:
    """A session builds the layers of `t`; then its layer is changed at its top (`planted`: a
    file added there) or replaced (`replaced`: a copy with another f1 renamed to its name); the
    next session of `t` shows what?"""
    from tests.session._util import run_session

    use_form(form)
    store, _src = new_store(base)
    proj, out = os.path.join(base, "proj"), os.path.join(base, "out")
    run_session(store, ["t"], ["true"], at=proj)
    (st,) = list(state.iter_states(store))
    (layer,) = st.layers
    if how == "planted":
        with open(os.path.join(layer, "planted"), "w") as f:
            f.write("evil\n")
    else:
        copy = os.path.join(os.path.dirname(layer), "copy")
        shutil.copytree(layer, copy, symlinks=True, ignore=lambda d, names: ["f1"])
        with open(os.path.join(copy, "f1"), "w") as f:
            f.write("evil\n")
        os.rename(layer, os.path.join(base, "aside"))  # (hard links to +i proxies: no rmtree)
        os.rename(copy, layer)
    script = f"ls -A {proj} > {out}; cat {proj}/f1 >> {out}"
    res = run_session(store, ["t"], ["sh", "-c", script], at=proj)
    with open(out) as f:
        seen = f.read().split()
    return {"status": res.exit_status, "planted": "planted" in seen, "f1": seen[-1]}


@pytest.mark.parametrize("how", ["planted", "replaced"])
@pytest.mark.parametrize(("mode", "form"), mode_form_params(store_layers=True))
def test_a_layer_changed_at_its_top_is_not_mounted_again(mode: str, form: str, how: str) -> None:
    """The warm path checked only that a stack's layers were directories: a layer replaced, or
    with a file added at its top, was mounted as the manifest's tree by every later session. A
    stack records each layer's inode number and ctime now (one stat, which the warm path made
    anyway); a layer that no longer matches is built again."""
    with unpriv_tmpdir() as base:
        r = as_mode(mode, _tampered, base, form, how)
    assert r == {"status": 0, "planted": False, "f1": "one"}, r
