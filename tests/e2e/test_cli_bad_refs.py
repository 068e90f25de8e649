"""A ref or version no store can hold gets one answer from every verb that takes one: `bad-ref`,
before any store, lock or registry is touched. `log ''` and `refs --delete ''` said not-found
where `ls ''` said bad-ref, `log 'a b'` not-found, `ingest --name ''` took the directory's name,
and `push '' REMOTE` asked the registry first (remote-unreachable)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from tests.e2e.test_cli import data, failed, ok, velo
from tests.helpers.trees import make_tree
from veloverlay.errors import VeloError
from veloverlay.store.versions import check_ref_name, check_revision

BAD = ["", "..", "a b", "@{x}", "a\nb", "proj\n", "a\x01b", ".x", "proj@{x}"]

# R: the bad ref; S: the source tree; B: a bundle of proj; L: a listening port nobody answers
VERBS = [
    ["log", "R"],
    ["refs", "--delete", "R"],
    ["ls", "R"],
    ["cat", "R", "README"],
    ["checkout", "R", "S/out"],
    ["rollback", "R"],
    ["rollback", "proj", "R"],
    ["export", "R", "-o", "S/out.velo"],
    ["export", "R", "-o", "-"],
    ["tag", "t", "R"],
    ["diff", "R", "proj"],
    ["diff", "proj", "R"],
    ["tiers", "explain", "x", "--ref", "R"],
    ["ingest", "S", "--name", "R"],
    ["import", "B", "--name", "R"],
    ["pull", "127.0.0.1:L/x/y:z", "--name", "R"],
    ["push", "R", "127.0.0.1:L/x/y"],
    ["push", "proj", "R", "127.0.0.1:L/x/y"],
    ["run", "R", "--", "true"],
]


@pytest.fixture
def setup(shm_tmp: str) -> tuple[str, str, str]:
    store, src = os.path.join(shm_tmp, "store"), os.path.join(shm_tmp, "proj")
    make_tree(src, {"README": b"hello\n"})
    ok(velo(store, "ingest", src, "-n", "proj"))
    bundle = os.path.join(shm_tmp, "proj.velo")
    ok(velo(store, "export", "proj", "-o", bundle))
    return store, src, bundle


@pytest.mark.parametrize("bad", BAD)
def test_every_verb_gives_bad_ref_for_a_bad_ref_and_changes_nothing(
    setup: tuple[str, str, str], bad: str
) -> None:
    store, src, bundle = setup
    before = data(velo(store, "refs", "--json"))
    with socket.socket() as registry:  # a registry asked anything would see a connection
        registry.bind(("127.0.0.1", 0))
        registry.listen(8)
        registry.setblocking(False)
        port = str(registry.getsockname()[1])
        for verb in VERBS:
            args = [
                {"R": bad, "S": src, "B": bundle, "L": port}.get(w, w)
                .replace("S/", src + "/")
                .replace(":L/", f":{port}/")
                for w in verb
            ]
            p = velo(store, "--json", *args)
            failed(p, "bad-ref")
            assert json.loads(p.stdout)["reason"] == "bad-ref", verb
            with pytest.raises(BlockingIOError):
                registry.accept()
    assert data(velo(store, "refs", "--json")) == before
    assert data(velo(store, "tag", "--json")) == []
    assert sorted(os.listdir(src)) == ["README"]  # no checkout, no bundle made
    assert data(velo(store, "fsck", "--json"))["ok"]


def test_a_bad_ingest_name_makes_no_store(shm_tmp: str) -> None:
    store, src = os.path.join(shm_tmp, "store"), os.path.join(shm_tmp, "proj")
    make_tree(src, {"README": b"hello\n"})
    failed(velo(store, "--json", "ingest", src, "--name", ""), "bad-ref")
    assert not os.path.exists(store)


def test_push_of_a_missing_ref_asks_no_registry(setup: tuple[str, str, str]) -> None:
    store, _src, _bundle = setup
    with socket.socket() as registry:
        registry.bind(("127.0.0.1", 0))
        registry.listen(8)
        registry.setblocking(False)
        remote = f"127.0.0.1:{registry.getsockname()[1]}/x/y"
        failed(velo(store, "--json", "push", "proj", "nope", remote), "not-found")
        with pytest.raises(BlockingIOError):
            registry.accept()


@pytest.mark.parametrize("bad", [*BAD, "a/b", "a\0b", "x" * 600])
def test_no_bad_ref_is_a_ref_name_or_a_version(bad: str) -> None:
    """NUL cannot go through argv: the checks every verb calls, directly."""
    for check in (check_ref_name, check_revision):
        with pytest.raises(VeloError) as e:
            check(bad)
        assert e.value.reason.value == "bad-ref"
    for good in ("proj", "proj@{1}", "proj@s1", "v1.0", "abcd1234"):
        assert check_revision(good) == good


@pytest.mark.parametrize("bad", ["", "a b", "a@b", "..", "a\nb", "a/b"])
def test_a_name_no_tag_can_have_is_bad_name_to_make_and_to_delete(
    setup: tuple[str, str, str], bad: str
) -> None:
    """`tag 'a b' proj` said bad-name, `tag --delete 'a b'` not-found (as if such a tag could
    be): both now say bad-name, and the tags are untouched."""
    store, _src, _bundle = setup
    ok(velo(store, "tag", "keep", "proj"))
    for args in (["tag", bad, "proj"], ["tag", "--delete", bad]):
        failed(velo(store, "--json", *args), "bad-name")
    assert [t["name"] for t in data(velo(store, "tag", "--json"))] == ["keep"]
