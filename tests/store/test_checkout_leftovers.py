"""What a checkout of an earlier version left behind is reclaimed too.

A checkout killed midway leaves its partial directory beside DEST, and the next checkout to DEST
removes it (ours, unlocked, its pid gone, in a parent no other user may rename entries of). The
partial name became `.DEST.velo-partial-PID-RANDOM`; leftovers of the earlier form
`.DEST.velo-partial-PID[-N]` (N < 100, DEST cut 12 bytes before the 255-byte limit) no longer
matched and stayed for good, with the whole half-written tree in them. They are now reclaimed
under the same rules, and names of neither form stay.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.trees import assert_same_tree
from tests.session._util import checkout_ref, new_store

GONE = 4194305  # above the largest pid Linux allows (PID_MAX_LIMIT): no such process


def _leftover(parent: str, name: str) -> None:
    """A partial tree as a killed checkout leaves it: a few files and a directory, unlocked."""
    top = os.path.join(parent, name)
    os.makedirs(os.path.join(top, "sub"))
    for rel in ("a", "sub/b"):
        with open(os.path.join(top, rel), "w") as f:
            f.write("half a tree\n")


@pytest.mark.parametrize("dest_name", ["dest", "d" * 240], ids=["short", "cut-to-the-limit"])
def test_leftovers_of_the_earlier_partial_names_are_reclaimed(shm_tmp: str, dest_name: str) -> None:
    store, src = new_store(os.path.join(shm_tmp, "w"))
    out = os.path.join(shm_tmp, "out")
    os.mkdir(out)
    old_prefix = "." + dest_name[: 255 - len(".velo-partial-") - 1 - 12] + ".velo-partial-"
    gone = [f"{old_prefix}{GONE}", f"{old_prefix}{GONE}-1", f"{old_prefix}{GONE}-99"]
    stay = [
        f"{old_prefix}{os.getpid()}",  # a checkout that may still be starting
        f"{old_prefix}{os.getpid()}-3",
        f"{old_prefix}{GONE}-100",  # never a name of ours: N < 100
        f"{old_prefix}{GONE}-07",
        f"{old_prefix}{GONE}x",
        f"{old_prefix}0{GONE}",
        f".other{'.velo-partial-'}{GONE}",  # another destination's
    ]
    for name in gone + stay:
        _leftover(out, name)
    dest = os.path.join(out, dest_name)

    checkout_ref(store, "t", dest)

    assert_same_tree(src, dest)
    # old: the three leftovers of the earlier form stayed beside DEST
    assert sorted(os.listdir(out)) == sorted([dest_name, *stay])
    for name in stay:
        assert sorted(os.listdir(os.path.join(out, name))) == ["a", "sub"]


def test_earlier_leftovers_in_a_parent_others_may_change_stay(shm_tmp: str) -> None:
    """There a leftover's name proves nothing (anyone could have given a directory of ours that
    name), as for the current form."""
    store, src = new_store(os.path.join(shm_tmp, "w"))
    out = os.path.join(shm_tmp, "out")
    os.mkdir(out)
    os.chmod(out, 0o777)
    left = f".dest.velo-partial-{GONE}-2"
    _leftover(out, left)
    checkout_ref(store, "t", os.path.join(out, "dest"))
    assert_same_tree(src, os.path.join(out, "dest"))
    assert sorted(os.listdir(out)) == [left, "dest"]
    assert sorted(os.listdir(os.path.join(out, left))) == ["a", "sub"]
