"""A root checkout writes only into the directory its destination names, even when a directory
on the way is another user's.

Checkout made its destination by path, then opened it by path (O_NOFOLLOW covers only the last
component): uid UNPRIV_UID, who owns a directory on the way, renamed it and put a symbolic link
to root's directory in its place right after root's mkdir, and root wrote the ref's files into
root's directory behind the link and chmod-ed it (an attacker watches for the mkdir with
inotify; here the swap lands deterministically, from a wrapped os.mkdir). Root's directory must
stay as it was and the checkout must say what happened (target-invalid)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import pytest

from tests.helpers.races import swap_at_mkdir
from tests.helpers.trees import inode_flags_at
from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged, unpriv_tmpdir
from tests.session._util import checkout_ref, new_store
from veloverlay import fsflags
from veloverlay.errors import Reason, VeloError
from veloverlay.store import dest as dest_module

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to check out and another uid to be the attacker"
)

VICTIM_MODE = 0o750


def scenario(base: str, keep: list[str]) -> tuple[str, str, Callable[[], None]]:
    """(anc, victim, swap): anc is uid UNPRIV_UID's; swap, done as that uid, renames it to
    anc.moved and puts a link to root's directory `holder` in its place, so that anc/dest is
    root's `victim` (mode VICTIM_MODE, the files `keep` in it)."""
    anc = os.path.join(base, "anc")
    os.mkdir(anc)
    os.chown(anc, UNPRIV_UID, UNPRIV_UID)
    holder = os.path.join(base, "holder")
    victim = os.path.join(holder, "dest")
    os.makedirs(victim)
    for name in keep:
        with open(os.path.join(victim, name), "w") as f:
            f.write("root's\n")
    os.chmod(victim, VICTIM_MODE)

    def attack() -> None:
        os.rename(anc, anc + ".moved")
        os.symlink(holder, anc)

    return anc, victim, lambda: run_unprivileged(attack)


@pytest.mark.parametrize(
    ("before", "keep"),
    [(False, ["keep"]), (True, [])],
    ids=["after-mkdir", "before-mkdir-into-an-empty-one"],
)
def test_a_directory_swapped_on_the_way_to_the_destination_is_refused(
    monkeypatch: pytest.MonkeyPatch, before: bool, keep: list[str]
) -> None:
    """After root's mkdir, the old code wrote the ref into root's directory (new names only)
    and gave it the ref's mode; before it, into root's empty directory (its mkdir found one
    there: an empty directory is a fine destination)."""
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        anc, victim, swap = scenario(base, keep)
        dest = os.path.join(anc, "dest")
        # the tree is written beside the destination first, then renamed into place; its
        # random partial name is fixed here so that the swap can land at its mkdir
        fixed = f".dest.velo-partial-{os.getpid()}-{'0' * 16}"
        monkeypatch.setattr(dest_module, "_partial_name", lambda name: fixed)
        partial = os.path.join(anc, fixed)
        swap_at_mkdir(monkeypatch, partial, swap, before=before)
        with pytest.raises(VeloError) as exc:
            checkout_ref(store, "t", dest)
        monkeypatch.undo()
        assert exc.value.reason is Reason.TARGET_INVALID, exc.value
        assert "changed while it was opened" in exc.value.message, exc.value.message
        assert exc.value.hint
        assert sorted(os.listdir(victim)) == keep
        assert stat.S_IMODE(os.stat(victim).st_mode) == VICTIM_MODE
        assert os.listdir(anc + ".moved") == []  # the directory root made there is gone again


def test_a_destination_through_a_symlink_resolved_at_the_start_still_works() -> None:
    """A symlink on the way that was there from the start is resolved once and is fine; a
    symlink as the destination itself is refused (exists), as before."""
    with unpriv_tmpdir() as base:
        store, src = new_store(base)
        os.mkdir(os.path.join(base, "real"))
        os.symlink(os.path.join(base, "real"), os.path.join(base, "via"))
        checkout_ref(store, "t", os.path.join(base, "via", "out"))
        assert sorted(os.listdir(os.path.join(base, "real", "out"))) == sorted(os.listdir(src))
        os.mkdir(os.path.join(base, "empty"))
        os.symlink(os.path.join(base, "empty"), os.path.join(base, "link"))
        with pytest.raises(VeloError) as exc:
            checkout_ref(store, "t", os.path.join(base, "link"))
        assert exc.value.reason is Reason.EXISTS
        assert os.listdir(os.path.join(base, "empty")) == []


def test_a_destination_that_cannot_be_made_is_named_whole() -> None:
    """A destination whose last name is over 255 bytes, or whose parent refuses a mkdir, failed
    with Python's OSError naming only that last component ('[Errno 1] Operation not permitted:
    'x'', reason os-error): now the whole path, and a name too long is the user's bad path."""
    with unpriv_tmpdir() as base:
        store, _src = new_store(base)
        long_dest = os.path.join(base, "a" * 300)
        with pytest.raises(VeloError) as exc:
            checkout_ref(store, "t", long_dest)
        assert exc.value.reason is Reason.BAD_PATH and exc.value.path == long_dest
        # an immutable parent: root's mkdir there is EPERM (sysfs was the example: a kernel
        # interface is now refused before any mkdir, target-invalid, naming the whole path too)
        frozen = os.path.join(base, "frozen")
        os.mkdir(frozen)
        if inode_flags_at(frozen):
            fsflags.set_immutable(frozen)
            try:
                with pytest.raises(OSError) as err:
                    checkout_ref(store, "t", os.path.join(frozen, "velo-checkout"))
            finally:
                fsflags.set_immutable(frozen, False)
            assert err.value.filename == os.path.join(frozen, "velo-checkout")
            assert os.listdir(frozen) == []
        if os.path.isdir("/sys/kernel"):
            with pytest.raises(VeloError) as exc:
                checkout_ref(store, "t", "/sys/kernel/velo-checkout")
            assert exc.value.reason is Reason.TARGET_INVALID
            assert exc.value.path == "/sys/kernel/velo-checkout"
            assert not os.path.lexists("/sys/kernel/velo-checkout")
