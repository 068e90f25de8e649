"""Another user of a shared parent cannot take a checkout's partial name first.

A checkout writes its tree into a partial directory beside DEST and renames it into place. Its
name was `.DEST.velo-partial-PID[-N]`, N < 100: pids are handed out in order, so uid UNPRIV_UID
in a sticky /tmp made those hundred names first (empty directories of theirs, or symbolic links
to a directory of theirs) and root's checkout failed ("no free partial name beside DEST"). The
partial name now carries 64 random bits and is made by mkdir (an existing entry is never used):
the checkout works, writes nothing through or into the planted entries, and leaves them as they
were.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.trees import assert_same_tree
from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged, unpriv_tmpdir
from tests.session._util import checkout_ref, new_store

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to check out and another uid to plant names"
)


def _plant(parent: str, names: list[str], kind: str, theirs: str) -> None:
    os.mkdir(theirs)
    for n in names:
        if kind == "dir":
            os.mkdir(os.path.join(parent, n), 0o777)
        else:
            os.symlink(theirs, os.path.join(parent, n))


def _entries(parent: str) -> dict[str, tuple[int, int, int]]:
    """Every entry of `parent`: (mode, uid, ino), not followed."""
    out = {}
    for n in os.listdir(parent):
        st = os.lstat(os.path.join(parent, n))
        out[n] = (st.st_mode, st.st_uid, st.st_ino)
    return out


@pytest.mark.parametrize("kind", ["dir", "symlink"])
def test_partial_names_made_first_by_another_user_neither_stop_nor_catch_a_checkout(
    kind: str,
) -> None:
    with unpriv_tmpdir() as base:  # sticky and world-writable, as /tmp
        store, src = new_store(os.path.join(base, "root"))
        shared = os.path.join(base, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o1777)
        theirs = os.path.join(base, "theirs")
        pid = os.getpid()  # the checkout runs here: the pid an attacker would predict
        names = [f".dest.velo-partial-{pid}"] + [
            f".dest.velo-partial-{pid}-{n}" for n in range(1, 100)
        ]
        run_unprivileged(_plant, shared, names, kind, theirs)
        before = _entries(shared)
        dest = os.path.join(shared, "dest")

        checkout_ref(store, "t", dest)  # old: VeloError "no free partial name beside ..."

        assert_same_tree(src, dest)
        after = _entries(shared)
        assert after.pop("dest")[1] == 0
        assert after == before  # the planted names untouched, nothing else left beside DEST
        assert os.listdir(theirs) == []  # nothing written through a link
        if kind == "dir":
            for n in names:
                assert os.listdir(os.path.join(shared, n)) == []
                assert os.stat(os.path.join(shared, n)).st_uid == UNPRIV_UID
