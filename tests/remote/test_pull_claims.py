"""A registry's sizes are claims. A pack index's size in the manifest (up to BlobCache.MAX, 64
MiB) was the length of the read of the cached copy of that index: `os.read(fd, size + 1)`
allocates the whole claimed length before it reads a byte, so a manifest naming a cached index
(a few hundred bytes) as 64 MiB cost 64 MiB per pack before "does not match". The cached copy's
size is now compared first; the blob is then fetched, and grows only as its bytes arrive."""

from __future__ import annotations

import os
import tracemalloc

import pytest

from tests.remote.fake_registry import FakeRegistry, file_entry, one_dir, sha
from veloverlay.errors import Reason, VeloError
from veloverlay.remote import Options, pull
from veloverlay.remote.state import BlobCache
from veloverlay.remote.version import (
    Descriptor,
    PackRef,
    build_manifest,
    parse_manifest,
)
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)
LIMIT = 32 << 20  # far below the claim, far above what the real bytes take


def _state(r: Repo) -> object:
    with r.m.read() as txn:
        refs = [(x.name, x.head) for x in r.m.refs(txn)]
    walk = [sorted(os.walk(os.path.join(r.store.root, d))) for d in ("objects-v2", "tmp")]
    return refs, walk


def test_a_cached_index_claimed_larger_than_it_is(fake: FakeRegistry, repo: Repo) -> None:
    data = b"one\n"
    root, nodes = one_dir([file_entry(b"f", data)])
    digest = fake.serve_version(nodes, {hash_bytes(data): data}, root, config={"ref": "env"})
    pull(repo.store, repo.m, fake.remote("v1"), options=OPTS)  # its indexes are cached now
    v = parse_manifest(fake.manifests[digest], digest, "")
    assert all(BlobCache(repo.store).get(p.index.digest, p.index.size) for p in v.packs)
    claimed = [
        PackRef(p.kind, p.pack, Descriptor(p.index.media_type, p.index.digest, BlobCache.MAX))
        for p in v.packs
    ]
    body = build_manifest(v.config, claimed, [], {})
    fake.manifests["big"] = fake.manifests[sha(body)] = body
    before = _state(repo)
    tracemalloc.start()
    try:
        with pytest.raises(VeloError) as ei:
            pull(repo.store, repo.m, fake.remote("big"), name="other", options=OPTS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ei.value.reason is Reason.REMOTE_INVALID, ei.value
    assert peak < LIMIT, f"{peak:,} bytes allocated for indexes of a few hundred bytes"
    assert _state(repo) == before
    # the cached copies were right: a lying manifest does not cost them
    assert all(BlobCache(repo.store).get(p.index.digest, p.index.size) for p in v.packs)
