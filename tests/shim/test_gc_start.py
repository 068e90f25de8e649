"""A shim session's start against gc: the stacked view of two refs is written at the start and
named by nothing until the session's state is saved. gc in between found it unreachable and
deleted its nodes, and the session then projected (and committed) a tree that was not there. The
start holds the store lock (shared) from resolving the refs to saving the state, as the overlay
backend does; gc (exclusive) waits. gc is started at exactly that point, and the test waits until
it has finished or blocks on the lock (`/proc/locks`): no sleep decides the outcome."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from tests.helpers.races import start_and_settle
from tests.helpers.trees import make_tree
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import fsck_ok, new_store
from tests.shim._util import SAFE_PATH
from veloverlay.ingest import ingest
from veloverlay.session import SessionOptions
from veloverlay.session import state as state_mod
from veloverlay.session.shim import backend as shim_backend
from veloverlay.store.manifest import Manifests


def test_gc_waits_for_a_shim_session_to_name_its_stacked_view(monkeypatch: Any) -> None:
    with unpriv_tmpdir() as base:
        store, _src = new_store(base, "low")
        top_src = os.path.join(base, "top-src")
        make_tree(top_src, {"top-only": b"from the top ref\n"})  # type: ignore[arg-type]
        m = Manifests(store)
        try:
            ingest(store, m, top_src, "top", jobs=1)
        finally:
            m.close()

        gcs: list[subprocess.Popen[str]] = []
        real = state_mod.save

        def save_after_gc(*a: Any, **kw: Any) -> None:
            if not gcs:  # the first save: the view is written, the state does not name it yet
                gcs.append(start_and_settle(os.fspath(store.root), ["gc", "--grace", "0"]))
            real(*a, **kw)

        monkeypatch.setattr(state_mod, "save", save_after_gc)
        proj = os.path.join(base, "proj")
        opts = SessionOptions(refs=["low", "top"], at=proj, grace=2.0)
        opts.link = False  # type: ignore[attr-defined]
        monkeypatch.setenv("PATH", SAFE_PATH)
        out = os.path.join(base, "seen")
        res = shim_backend.run_shim(
            store, opts, ["sh", "-c", f"cat {proj}/top-only {proj}/f1 > {out}"]
        )
        assert gcs
        _o, err = gcs[0].communicate(timeout=120)
        assert gcs[0].returncode == 0 and "Traceback" not in err, err
        assert res.exit_status == 0
        with open(out, "rb") as f:
            assert f.read() == b"from the top ref\none\n"
        assert fsck_ok(store) == []
