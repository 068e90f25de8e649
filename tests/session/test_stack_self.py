"""A stack whose top ref is also below it (`run r r`, `run r@{1} r`) is refused.

Such a session recorded each deletion of a path the lower copy provided as a MASK entry in r
itself: r then carried masks of its own paths (a single ref, no stack), which `diff`, `ls` and a
checkout of r did not show, and every later stack over r hid those paths."""

from __future__ import annotations

import os

import pytest

from tests.helpers.trees import make_tree
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest.pipeline import ingest
from veloverlay.session.target import resolve_stack
from veloverlay.verbs.repo import Repo


@pytest.mark.parametrize("below", ["r", "r@{1}"])
def test_the_top_ref_below_itself_is_refused(repo: Repo, shm_tmp: str, below: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a": b"1\n", "b": b"2\n"})
    ingest(repo.store, repo.m, src, "r", jobs=1)
    make_tree(src, {"c": b"3\n"})
    ingest(repo.store, repo.m, src, "r", jobs=1)
    with repo.m.read() as txn:
        head = repo.m.require_ref(txn, "r").head
    with pytest.raises(VeloError) as exc:
        resolve_stack(repo.m, [below, "r"])
    assert exc.value.reason is Reason.USAGE and exc.value.hint, exc.value
    assert "below itself" in exc.value.message
    with repo.m.read() as txn:
        assert repo.m.require_ref(txn, "r").head == head
    # another ref below, or r below another one, still stacks
    ingest(repo.store, repo.m, src, "base", jobs=1)
    assert resolve_stack(repo.m, ["base", "r"]).below is not None
    assert resolve_stack(repo.m, ["r", "base"]).below is not None
