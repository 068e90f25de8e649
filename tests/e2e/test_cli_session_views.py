"""One change of a session, described the same way wherever it is shown: the end-of-session
summary (`run --json` `changes`), `status`, `diff --session` while it runs, and `diff REF@{1}
REF` of what it committed; each checked against the real trees (checkouts of the top ref before
and after, the source directories the refs were ingested from)."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.test_cli import _expected_changes, data, ok, velo
from tests.e2e.test_cli_session import _checkout
from tests.helpers.trees import make_tree

pytestmark = pytest.mark.needs("root", "overlay_root")


@pytest.fixture
def store(shm_tmp: str) -> str:
    return os.path.join(shm_tmp, "store")


def _stack(store: str, shm_tmp: str) -> tuple[str, str]:
    """Refs `lo` and `hi` (stacked `lo hi`): `d` in both, `e` in lo alone, `f` in hi alone."""
    lo, hi = os.path.join(shm_tmp, "lo"), os.path.join(shm_tmp, "hi")
    make_tree(lo, {"d/k": b"low\n", "d/lowonly": b"lo\n", "e/x": b"e\n", "e/s/t": b"t\n"})
    make_tree(hi, {"d/k": b"top\n", "d/hionly": b"hi\n", "f/y": b"f\n", "g/z": b"g\n"})
    ok(velo(store, "ingest", lo, "-n", "lo"))
    ok(velo(store, "ingest", hi, "-n", "hi"))
    return lo, hi


def _pairs(rows: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(r["status"], r["path"]) for r in rows]


@pytest.mark.parametrize("backend", ["overlay", "shim"])
def test_a_stacked_sessions_summary_says_what_diff_of_its_commit_says(
    store: str, shm_tmp: str, backend: str
) -> None:
    """The summary of a stacked session listed its changes as the stacked view saw them: `D
    e/x`, `D e/s/t` for a directory only the lower ref had, deleted whole, and `M` for a lower
    ref's file changed, where `diff hi@{1} hi` of what it committed says `D e` (one mask) and
    `A` (the top ref gained the file). It now says what that diff says."""
    _stack(store, shm_tmp)
    before = _checkout(store, "hi", os.path.join(shm_tmp, "before"))
    at = os.path.join(shm_tmp, "at")
    script = f"cd {at} && rm -r e g && echo more >> d/lowonly && echo new > n"
    p = velo(
        store, "run", "lo", "hi", "--at", at, "--backend", backend, "--json", "--",
        "sh", "-c", script,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    summary = _pairs(json.loads(p.stdout)["changes"])
    after = _checkout(store, "hi", os.path.join(shm_tmp, "after"))
    # the real thing: the top ref's own files before and after, and one mask for `e`, the
    # directory of the lower ref alone the command deleted whole
    want = {**_expected_changes(before, after), "e": "D"}
    assert {path: status for status, path in summary} == want and len(summary) == len(want)
    assert summary == _pairs(data(velo(store, "diff", "hi@{1}", "hi", "--json")))
