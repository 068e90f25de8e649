"""Packs as a registry may serve them. An index that does not describe its pack as the format
says (the entries, in offset order, cover the pack from its header to its end, back to back) is
refused: bytes between entries, before the first or after the last are fetched for nothing and
carry what no entry names. A registry that refuses range requests (416) gets the pack read whole."""

from __future__ import annotations

import http.server
import json
import os

import pytest

from tests.helpers.trees import assert_same_tree, make_tree
from tests.remote.fake_registry import FakeRegistry, file_entry, one_dir, sha
from veloverlay.errors import Reason, VeloError
from veloverlay.ingest import ingest
from veloverlay.remote import Options, pull
from veloverlay.remote.pack import KIND_OBJECT, PACK_HEADER, Entry, decode_index, encode_index
from veloverlay.remote.version import A_INDEX, A_KIND
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)
H = len(PACK_HEADER)
A, B = b"\x01" * 32, b"\x02" * 32


@pytest.mark.parametrize(
    ("spans", "size"),
    [
        (((H, 2), (H + 3, 1)), H + 4),  # a byte between the two entries
        (((H + 1, 2), (H + 3, 1)), H + 4),  # a byte between the header and the first
        (((H, 2), (H + 2, 1)), H + 4),  # a byte after the last
    ],
    ids=["between", "after-header", "trailing"],
)
def test_an_index_with_gaps_is_refused(spans: tuple[tuple[int, int], ...], size: int) -> None:
    index = encode_index(
        [Entry(KIND_OBJECT, d, o, n) for d, (o, n) in zip((A, B), spans, strict=True)]
    )
    with pytest.raises(VeloError) as ei:
        decode_index(index, size)
    assert ei.value.reason is Reason.REMOTE_INVALID
    assert "belong to no entry" in ei.value.message


def test_back_to_back_entries_and_empty_ones_are_accepted() -> None:
    entries = [Entry(KIND_OBJECT, A, H, 0), Entry(KIND_OBJECT, B, H, 3)]  # (an empty file)
    assert decode_index(encode_index(entries), H + 3) == entries


def test_a_pull_refuses_a_pack_with_slack_between_its_entries(
    fake: FakeRegistry, repo: Repo
) -> None:
    """The registry serves a pack whose index leaves a hidden run of bytes between two objects;
    the pull is refused and nothing is named."""
    a, b = b"A" * 100, b"B" * 100
    root, nodes = one_dir([file_entry(b"a", a), file_entry(b"b", b)])
    fake.serve_version(nodes, {hash_bytes(a): a}, root)
    man = json.loads(fake.manifests["v1"])
    at = next(
        i for i, x in enumerate(man["layers"]) if x.get("annotations", {}).get(A_KIND) == "objects"
    )
    pack = PACK_HEADER + a + b"hidden payload" + b
    ea = Entry(KIND_OBJECT, hash_bytes(a), H, len(a))
    eb = Entry(KIND_OBJECT, hash_bytes(b), H + len(a) + 14, len(b))
    idx = encode_index([ea, eb])
    old_idx = man["layers"][at]["annotations"][A_INDEX]
    man["layers"][at] = dict(
        man["layers"][at],
        digest=fake.put(pack),
        size=len(pack),
        annotations=dict(man["layers"][at]["annotations"], **{A_INDEX: fake.put(idx)}),
    )
    for layer in man["layers"]:
        if layer["digest"] == old_idx:
            layer.update(digest=sha(idx), size=len(idx))
    fake.manifests["v1"] = json.dumps(man).encode()
    with pytest.raises(VeloError) as ei:
        pull(repo.store, repo.m, fake.remote(), options=OPTS)
    assert ei.value.reason is Reason.REMOTE_INVALID, ei.value
    assert "belong to no entry" in ei.value.message
    with repo.m.read() as txn:
        assert list(repo.m.refs(txn)) == []
    assert repo.store.missing([hash_bytes(a), hash_bytes(b)]) == [hash_bytes(a), hash_bytes(b)]


def test_a_registry_that_refuses_ranges_with_416_is_read_whole(
    fake: FakeRegistry, repo: Repo, shm_tmp: str
) -> None:
    """Range requests are optional in the distribution spec: a registry that answers one with
    416 (Range Not Satisfiable) made the pull fail; the pack is read whole instead."""
    src = os.path.join(shm_tmp, "src")
    files = {f"f{i:02}": os.urandom(100_000) for i in range(20)}
    make_tree(src, dict(files))
    for name in files:
        os.chmod(os.path.join(src, name), 0o644)
    os.chmod(src, 0o755)
    part = os.path.join(shm_tmp, "part")
    make_tree(part, {k: v for k, v in files.items() if k != "f07"})  # all but one object
    ingest(repo.store, repo.m, part, "mine", jobs=1)
    entries = [file_entry(k.encode(), v) for k, v in sorted(files.items())]
    root, nodes = one_dir(entries)
    fake.serve_version(nodes, {hash_bytes(v): v for v in files.values()}, root)
    ranged: list[str] = []

    def no_ranges(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if method == "GET" and h.headers.get("Range"):
            ranged.append(h.headers["Range"])
            h.send(416, headers={"Content-Range": "bytes */0"})  # type: ignore[attr-defined]
            return True
        return False

    fake.hook = no_ranges
    res = pull(repo.store, repo.m, fake.remote(), name="env", options=OPTS)
    assert ranged  # (the pull asked for a range: only one object of twenty was missing)
    assert res.objects_fetched == 1
    out = os.path.join(shm_tmp, "out")
    repo.checkout("env", out)
    assert_same_tree(out, src, mtimes=False, dir_mtimes=False)
