"""A ref's remote note vouches only for the head that came from (or went to) that registry.
`import --force`, an ingest into a pulled ref, and `pull --force` from a second registry left the
first registry's note as it was (same ref, same lineage), so a later pull from the first moved the
ref without --force, over a head that never came from there. Notes now carry the head: anything
that moves the ref, whatever it is, makes the note of every other source say nothing."""

from __future__ import annotations

import io
import os

import pytest

from tests.helpers.trees import make_tree
from tests.remote.fake_registry import FakeRegistry, file_entry, one_dir
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull, push
from veloverlay.store.bundle import export_bundle, import_bundle
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)


def _serve(fake: FakeRegistry, data: bytes, tag: str) -> None:
    root, nodes = one_dir([file_entry(b"f", data)])
    fake.serve_version(nodes, {hash_bytes(data): data}, root, tag=tag, config={"ref": "env"})


def _f(repo: Repo, shm_tmp: str, name: str) -> bytes:
    out = os.path.join(shm_tmp, name)
    repo.checkout("env", out)
    with open(os.path.join(out, "f"), "rb") as f:
        return f.read()


def _refused(repo: Repo, remote: str) -> None:
    with pytest.raises(VeloError) as ei:
        pull(repo.store, repo.m, remote, options=OPTS)
    assert ei.value.reason is Reason.OTHER_SOURCE, ei.value


def _other_bundle(shm_tmp: str, data: bytes) -> bytes:
    other = Repo.open(os.path.join(shm_tmp, "other-store"), create=True)
    try:
        src = os.path.join(shm_tmp, "other-src")
        make_tree(src, {"f": data})
        ingest(other.store, other.m, src, "env", jobs=1)
        buf = io.BytesIO()
        export_bundle(other.store, other.m, "env", buf)
        return buf.getvalue()
    finally:
        other.close()


@pytest.mark.parametrize("how", ["import", "ingest", "pull-other"])
def test_a_ref_moved_from_elsewhere_is_not_the_first_registrys(
    fake: FakeRegistry, repo: Repo, shm_tmp: str, how: str
) -> None:
    _serve(fake, b"one\n", "v1")
    _serve(fake, b"two\n", "v2")
    pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)
    second = FakeRegistry()
    try:
        if how == "import":
            bundle = _other_bundle(shm_tmp, b"mine\n")
            import_bundle(repo.store, repo.m, io.BytesIO(bundle), force=True)
        elif how == "ingest":
            src = os.path.join(shm_tmp, "mine")
            make_tree(src, {"f": b"mine\n"})
            ingest(repo.store, repo.m, src, "env", jobs=1)
        else:
            _serve(second, b"mine\n", "v1")
            _refused(repo, second.remote("v1"))
            pull(repo.store, repo.m, second.remote("v1"), options=OPTS, force=True)
        assert _f(repo, shm_tmp, "a") == b"mine\n"
        _refused(repo, fake.remote("v2"))  # the old code moved it: "two"
        assert _f(repo, shm_tmp, "b") == b"mine\n"
        if how == "pull-other":  # the registry it now came from moves it without --force
            _serve(second, b"three\n", "v2")
            pull(repo.store, repo.m, second.remote("v2"), options=OPTS)
            assert _f(repo, shm_tmp, "c") == b"three\n"
        # --force still does what it says, and from then on that registry is the ref's source
        pull(repo.store, repo.m, fake.remote("v2"), options=OPTS, force=True)
        assert _f(repo, shm_tmp, "d") == b"two\n"
        _serve(fake, b"four\n", "v3")
        pull(repo.store, repo.m, fake.remote("v3"), options=OPTS)
        assert _f(repo, shm_tmp, "e") == b"four\n"
    finally:
        second.close()


def test_a_push_vouches_for_the_head_it_sent(fake: FakeRegistry, repo: Repo, shm_tmp: str) -> None:
    """Pushed, then changed here and not pushed again: a pull of that registry would put its
    version over the unpushed one without a word; it needs --force (a push again makes it
    the source again)."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"f": b"one\n"})
    ingest(repo.store, repo.m, src, "env", jobs=1)
    push(repo.store, repo.m, ["env"], fake.remote("v1"), options=OPTS)
    pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)  # pushed from here: its source
    make_tree(src, {"f": b"two\n"})
    ingest(repo.store, repo.m, src, "env", jobs=1)
    _refused(repo, fake.remote("v1"))
    assert _f(repo, shm_tmp, "a") == b"two\n"
