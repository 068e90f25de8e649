"""A lower ref of a stack that changes while a session of the stack runs.

The session's change goes to the top ref; where it touches a path the lower ref changed
meanwhile (re-ingested here), the top ref's new entry (or mask) hides the lower ref's new version
in the stack — silently: the session ended with "committed" and nothing else. It now says which
paths and which ref. Paths the session did not touch show the lower ref's new version, unsaid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

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
    proj, go, started = (os.path.join(shm_tmp, n) for n in ("proj", "go", "started"))
    script = (
        f"cd {proj} && printf mine > f1 && rm f2 && printf new > added && touch {started} && "
        f"while [ ! -e {go} ]; do sleep 0.02; done"
    )
    velo = [sys.executable, "-m", "veloverlay", "--store", os.fspath(store.root), "--json"]
    p = subprocess.Popen(
        [*velo, "run", "t", "u", "--at", proj, "--", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(started):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.02)
        for name in ("f1", "f2", "f3"):  # t gets new versions of three files
            with open(os.path.join(src, name), "ab") as f:
                f.write(b" and t's new line\n")
        m = Manifests(store)
        try:
            ingest(store, m, src, "t", jobs=1)
        finally:
            m.close()
    finally:
        open(go, "w").close()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    res = json.loads(out)
    said = [w for w in res["warnings"] if "changed while the session ran" in w]
    assert len(said) == 1, res["warnings"]
    # f1 (written) and f2 (deleted: a mask) hide t's new versions; f3 was not touched
    assert "f1" in said[0] and "f2" in said[0] and "t" in said[0], said
    assert "f3" not in said[0] and "added" not in said[0], said
