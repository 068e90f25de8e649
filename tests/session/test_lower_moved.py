"""A lower ref of a stack that changes while a session of the stack runs.

The session's change goes to the top ref; where it touches a path the lower ref changed
meanwhile (re-ingested here), the top ref's new entry (or mask) hides the lower ref's new version
in the stack — silently: the session ended with "committed" and nothing else. It now says which
paths and which ref. Paths the session did not touch show the lower ref's new version, unsaid."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import live_session
from tests.helpers.trees import make_tree
from tests.session._util import new_store
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.manifest import Manifests


@pytest.mark.needs("root", "overlay_root")
def test_a_change_that_hides_a_lower_refs_new_version_is_reported(shm_tmp: str) -> None:
    store, src = new_store(shm_tmp)  # t
    top = os.path.join(shm_tmp, "top")
    make_tree(top, {"only-top": b"u\n"})
    m = Manifests(store)
    try:
        ingest(store, m, top, "u", jobs=1)
    finally:
        m.close()
    proj = os.path.join(shm_tmp, "proj")
    command = f"cd {proj} && printf mine > f1 && rm f2 && printf new > added"
    with live_session(
        store.root, "--json", "run", "t", "u", "--at", proj, command=command, base=shm_tmp
    ) as p:
        for name in ("f1", "f2", "f3"):  # t gets new versions of three files
            with open(os.path.join(src, name), "ab") as f:
                f.write(b" and t's new line\n")
        m = Manifests(store)
        try:
            ingest(store, m, src, "t", jobs=1)
        finally:
            m.close()
    assert p.returncode == 0, p.err
    res = json.loads(p.out)
    said = [w for w in res["warnings"] if "changed while the session ran" in w]
    assert len(said) == 1, res["warnings"]
    # f1 (written) and f2 (deleted: a mask) hide t's new versions; f3 was not touched
    assert "f1" in said[0] and "f2" in said[0] and "t" in said[0], said
    assert "f3" not in said[0] and "added" not in said[0], said
