"""A session's tier rules are those its ref had when it started, not those of whatever ref has
the name when it ends.

An overlay session's state did not record them: its harvest classified the new files with the
ref's rules at harvest, and a kept `REF@<session>` took them too. When the ref was deleted and
made anew from another tree with other rules while the session ran, the session's own tree (kept
as `REF@<session>`) was classified with the stranger's rules and recorded them as its own; when
it was only deleted, with the default rules. Found by reviewing how a kept ref gets its rules."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.cli import live_session
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests
from veloverlay.tiers import parse_rules
from veloverlay.verbs.repo import Repo

# the session's ref: `.dat` files are Tier-1; the default rules (and the stranger's) say Tier-2
START_RULES = parse_rules("1 **/*.dat # assets\n2 **\n")


def _session_while_the_ref_changes(base: str, remake: bool) -> tuple[dict[str, object], Repo]:
    src, proj = os.path.join(base, "src"), os.path.join(base, "proj")
    os.makedirs(src)
    with open(os.path.join(src, "old.dat"), "wb") as f:
        f.write(b"asset\n")
    store = Store.init(os.path.join(base, "store"))
    repo = Repo(store, Manifests(store))
    ingest(store, repo.m, src, "t", rules=START_RULES, jobs=1)
    command = f"cd {proj} && printf mine > new.dat"
    with live_session(
        store.root, "--json", "run", "t", "--at", proj, command=command, base=base
    ) as p:
        repo.delete_ref("t")
        if remake:  # another tree under the same name, with the default rules
            other = os.path.join(base, "other")
            os.makedirs(other)
            with open(os.path.join(other, "theirs.dat"), "wb") as f:
                f.write(b"another tree\n")
            ingest(store, repo.m, other, "t", jobs=1)
    assert p.returncode == 0, p.err
    return json.loads(p.out), repo


@pytest.mark.needs("root", "overlay_root")
@pytest.mark.parametrize("remake", [True, False], ids=["made-anew", "deleted"])
def test_a_kept_session_ref_has_the_rules_the_session_started_with(
    shm_tmp: str, remake: bool
) -> None:
    res, repo = _session_while_the_ref_changes(shm_tmp, remake)
    try:
        sref = f"t@{res['session_id']}"
        assert res["conflict_ref"] == sref
        with repo.m.read() as txn:
            kept = repo.m.require_ref(txn, sref)
            assert kept.tiers == START_RULES.to_json()
            root = bytes.fromhex(repo.m.get_commit(txn, kept.head).root)
            new = repo.m.lookup(txn, root, b"new.dat")
            old = repo.m.lookup(txn, root, b"old.dat")
        assert new is not None and old is not None
        # classified as the rules the session started with say, as the file it came with was
        assert START_RULES.classify(b"new.dat") == 1
        assert (new.tier, old.tier) == (1, 1)
    finally:
        repo.close()


def test_a_state_of_an_older_version_takes_the_refs_rules_as_before() -> None:
    from veloverlay.session.state import State

    old = {"id": "s", "refs": ["t"], "bases": ["00"], "view_root": "00", "target": "/x"}
    now = START_RULES.to_json()
    assert State.from_json(old).start_tiers(now) == now  # an overlay state recorded none
    shim = State.from_json({**old, "backend": "shim", "tiers": None})
    assert shim.start_tiers(now) is None  # a shim state always did: its ref had no rules
    new = State.from_json({**old, "tiers": None, "tiers_known": True})
    assert new.start_tiers(now) is None
