"""Root does not follow another user's symbolic link into a directory that user does not own.

A link of uid UNPRIV_UID's in a directory of theirs, leading to one of root's, would otherwise have
root check out into it, project over it or ingest (and with --adopt move aside) what it leads to.
Links of root's, and links to their owner's own files, are followed as before; an unprivileged
user follows whatever they like (only their own files are at stake).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.unpriv import UNPRIV_UID, run_unprivileged, unpriv_tmpdir
from veloverlay import pathtrust
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.session.target import overlay_target
from veloverlay.verbs.repo import Repo

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root, and another uid's links")


def _link(base: str, name: str, dest: str, owner: int) -> str:
    path = os.path.join(base, name)
    os.symlink(dest, path)
    os.lchown(path, owner, owner)
    return path


@pytest.fixture
def place() -> Iterator[dict[str, str]]:
    with unpriv_tmpdir() as base:
        home = os.path.join(base, "home")  # the other user's
        os.mkdir(home)
        os.makedirs(os.path.join(home, "work", "proj"))
        theirs = os.path.join(home, "work")
        for d in (home, theirs, os.path.join(theirs, "proj")):
            os.chown(d, UNPRIV_UID, UNPRIV_UID)
        roots = os.path.join(base, "roots")  # root's
        os.mkdir(roots, 0o755)
        with open(os.path.join(roots, "keep"), "w") as f:
            f.write("root's\n")
        yield {
            "base": base,
            "roots": roots,
            "theirs": theirs,
            "evil": _link(home, "evil", roots, UNPRIV_UID),
            "chain": _link(home, "chain", os.path.join(home, "evil"), UNPRIV_UID),
            "fine": _link(home, "fine", theirs, UNPRIV_UID),
            "roots_link": _link(base, "roots_link", roots, 0),
        }


def _untouched(p: dict[str, str]) -> bool:
    return sorted(os.listdir(p["roots"])) == ["keep"]


def test_the_rule(place: dict[str, str]) -> None:
    for bad in ("evil", "chain"):
        for path in (place[bad], os.path.join(place[bad], "sub", "x")):
            with pytest.raises(VeloError) as info:
                pathtrust.realpath_safe(path, Reason.TARGET_INVALID)
            assert info.value.reason is Reason.TARGET_INVALID
            assert f"of uid {UNPRIV_UID}" in str(info.value), info.value
    fine = os.path.join(place["fine"], "proj")
    assert pathtrust.realpath_safe(fine, Reason.TARGET_INVALID) == os.path.join(
        place["theirs"], "proj"
    )
    assert pathtrust.realpath_safe(place["roots_link"], Reason.TARGET_INVALID) == place["roots"]
    # Unprivileged, a user follows whatever they like: what they reach is theirs to reach.
    got = run_unprivileged(pathtrust.realpath_safe, place["evil"], Reason.TARGET_INVALID)
    assert got == place["roots"]


def _repo_with_tree(base: str) -> Repo:
    """A store at base/store holding ref "t", ingested from base/src (one file, "f")."""
    repo = Repo.open(os.path.join(base, "store"), create=True)
    try:
        src = os.path.join(base, "src")
        os.mkdir(src)
        with open(os.path.join(src, "f"), "w") as f:
            f.write("tree\n")
        ingest(repo.store, repo.m, src, "t", jobs=1)
    except BaseException:
        repo.close()
        raise
    return repo


def test_checkout_projection_and_ingest_refuse_the_link(place: dict[str, str]) -> None:
    repo = _repo_with_tree(place["base"])
    try:
        with pytest.raises(VeloError) as info:
            repo.checkout("t", os.path.join(place["evil"], "dest"))
        assert info.value.reason is Reason.TARGET_INVALID
        with repo.m.read() as txn:
            ref = repo.m.get_ref(txn, "t")
        assert ref is not None
        with pytest.raises(VeloError) as info:
            overlay_target(repo.store, os.path.join(place["chain"], "proj"), ref)
        assert info.value.reason is Reason.TARGET_INVALID
        with pytest.raises(VeloError) as info:
            ingest(repo.store, repo.m, place["evil"], "stolen", jobs=1)
        assert info.value.reason is Reason.BAD_PATH
        assert _untouched(place)
        with repo.m.read() as txn:
            assert repo.m.get_ref(txn, "stolen") is None
        # Through a link to their own directory, or one of root's: as before.
        repo.checkout("t", os.path.join(place["fine"], "dest"))
        with open(os.path.join(place["theirs"], "dest", "f")) as f:
            assert f.read() == "tree\n"
        repo.checkout("t", os.path.join(place["roots_link"], "dest"))
        assert sorted(os.listdir(place["roots"])) == ["dest", "keep"]
    finally:
        repo.close()


def test_export_neither_follows_the_link_nor_a_swap(
    place: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """export: through the link, refused; with the directory swapped for a link to root's while
    the bundle is written, the bundle still lands where it began (the directory, now moved)."""
    from veloverlay.store import bundle

    repo = _repo_with_tree(place["base"])
    try:
        with pytest.raises(VeloError) as info:
            bundle.export_to_path(repo.store, repo.m, "t", os.path.join(place["evil"], "b"))
        assert info.value.reason is Reason.BAD_PATH
        theirs = place["theirs"]
        real_export = bundle.export_bundle

        def swap_then_export(*args: object, **kw: object) -> object:
            def attack() -> None:
                os.rename(theirs, theirs + ".moved")
                os.symlink(place["roots"], theirs)

            run_unprivileged(attack)
            return real_export(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(bundle, "export_bundle", swap_then_export)
        info_ok = bundle.export_to_path(repo.store, repo.m, "t", os.path.join(theirs, "b"))
        assert info_ok["objects"] == 1
        assert _untouched(place)
        assert sorted(os.listdir(theirs + ".moved")) == ["b", "proj"]
    finally:
        repo.close()
