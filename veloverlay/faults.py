"""Crash points for the crash-safety tests: die by SIGKILL at the N-th crossing of a named point.

`VELO_INTERNAL__TEST_FAULT=<point>:<n>` makes `point("<point>")` kill the process (SIGKILL: no
cleanup, no atexit, no flush — a power cut as far as user space can fake one) the n-th time it is
reached; `<point>:<n>:<SIG>` sends that signal instead (once). Unset, `point()` is one dict
lookup. Points sit between the steps whose order makes the store crash-safe (stage, syncfs,
rename, syncfs, commit), so the tests can stop at each of them.
"""

from __future__ import annotations

import os
import signal

__all__ = ["point", "POINTS"]

POINTS = (
    "stage.written",  # an object file written into tmp/ (per object)
    "publish.synced",  # after the first syncfs, before any rename
    "publish.renamed",  # after one rename into the objects directory (per object)
    "publish.done",  # after the second syncfs, before the manifest commit
    "manifests.create",  # a new manifest database: LMDB made its file, before the schema commit
    "commit.before",  # inside the LMDB write transaction, before it commits
    "commit.after",  # after the manifest commit (ingest; a session's, before its state is saved)
    "gc.sweep",  # gc: after deleting one object (per object)
    "gc.migrate",  # gc: after moving one object into objects-v2 (per object)
    "import.record",  # bundle import: after reading one record
    "lower.build",  # lower-layer build: per entry written
    "harvest.file",  # harvest: per upper file staged
    "checkout.file",  # checkout: after writing one file of the tree (per file)
    "session.target",  # session start: its target found (or made) and held
    "materialize.file",  # shim session start: after placing one Tier-2 file of the tree
    "export.object",  # export: after writing one object into the bundle (per object)
    "remove.entry",  # remove-store: after removing one top-level part of the store
    "remote.pull.published",  # pull: after one batch of fetched objects is published
    "remote.pull.fetched",  # pull: every object published, before the nodes and ref commit
    "remote.pull.noted",  # pull: the ref's remote note written, before the nodes and ref commit
    "refs.delete.forgotten",  # refs --delete: the ref's remote notes forgotten, before its delete
)

_spec = os.environ.get("VELO_INTERNAL__TEST_FAULT", "")
_target, _, _rest = _spec.partition(":")
_count, _, _signame = _rest.partition(":")
_left = int(_count or 1) if _target else 0
# `<point>:<n>:<SIG>` (e.g. harvest.file:1:TERM) sends that signal once instead, and goes on:
# what a process does when `kill` reaches it at that point.
_signal = signal.Signals[f"SIG{_signame}"] if _signame else signal.SIGKILL


def point(name: str) -> None:
    global _left
    if name != _target or (_left <= 0 and _signal != signal.SIGKILL):
        return
    _left -= 1
    if _left <= 0:
        os.kill(os.getpid(), _signal)
