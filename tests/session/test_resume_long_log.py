"""`harvest --resume` of a session that had committed, after many later commits on its ref.

Whether an earlier finish of the session had committed was found by walking the ref's log back
from its head, but only 200 commits deep: with more commits since (other sessions, ingests), a
committed session was taken for one that had not, harvested again and merged into the ref a
second time (its changes re-applied over the later ones, or kept as a conflict ref). The walk
now goes back to the session's base."""

from __future__ import annotations

from veloverlay.session.commit import already_committed, harvest_and_commit, result_for
from veloverlay.session.state import State
from veloverlay.verbs.repo import Repo

LATER = 250  # commits made on the ref after the session's own (the old walk stopped at 200)


def test_a_committed_session_is_found_behind_many_later_commits(repo: Repo) -> None:
    m = repo.m
    with m.write() as txn:
        roots = [m.put_node(txn, 0o755, i * 1000, []) for i in range(LATER + 2)]
        base = m.commit(txn, "r", roots[0], expect_head=None, message="first")
        mine = m.commit(txn, "r", roots[1], expect_head=base.id, message="s", session="sess1")
        head = mine.id
        for root in roots[2:]:
            head = m.commit(txn, "r", root, expect_head=head, message="another session").id
    st = State(id="sess1", refs=["r"], bases=[base.id], view_root=roots[0].hex(), target="/x")
    with m.read() as txn:
        assert already_committed(m, txn, st) == (mine.id, None)
        # a session that never committed is still told apart (the walk stops at its base)
        other = State(
            id="sess2", refs=["r"], bases=[base.id], view_root=roots[0].hex(), target="/x"
        )
        assert already_committed(m, txn, other) == (None, None)

    def harvest_again(*_a: object) -> None:
        raise AssertionError("the session's changes were harvested (and merged) a second time")

    res = result_for(st, 0)
    assert harvest_and_commit(repo.store, m, st, res, harvest_again) is None  # type: ignore[arg-type]
    assert res.commit == mine.id and res.conflict_ref is None
    with m.read() as txn:
        assert m.require_ref(txn, "r").head == head  # nothing new committed
