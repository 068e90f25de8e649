"""A manifest database damaged at the page level (cut short, a page zeroed, bits flipped), a
seeded sample of it: refs, fsck and gc say `manifest-corrupt` (or work), never a traceback, and
gc deletes no object the undamaged store's refs reached.

Found by such a loop: a data.mdb cut inside its B-tree listed a ref key that a lookup by the
same key did not find, and refs, fsck and gc died on an assertion with a traceback."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from tests.store.test_damaged_records import every_digest, store
from tests.store.test_integrity import stored_objects, velo

__all__ = ["store"]  # the fixture, used here by name


def _damage(path: str, rng: random.Random) -> str:
    size = os.path.getsize(path)
    kind = rng.choice(["flip", "flip", "zero", "cut"])
    with open(path, "r+b") as f:
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                off = rng.randrange(size)
                f.seek(off)
                b = f.read(1)[0] ^ (1 << rng.randrange(8))
                f.seek(off)
                f.write(bytes([b]))
        elif kind == "zero":
            f.seek(rng.randrange(size // 4096) * 4096)
            f.write(bytes(4096))
        else:
            f.truncate(rng.randrange(size))
    return kind


def _check(store: str, shm_tmp: str, seed: int) -> None:
    copy = os.path.join(shm_tmp, f"copy-{seed}")
    shutil.copytree(store, copy, symlinks=True)
    kind = _damage(os.path.join(copy, "manifests.lmdb", "data.mdb"), random.Random(seed))
    for args in (["refs"], ["fsck"], ["gc", "--grace", "0"], ["gc", "--keep", "1", "--grace", "0"]):
        res = velo(copy, *args)
        assert "Traceback" not in res.stderr, (seed, kind, args, res.stderr[-1500:])
        assert res.returncode in (0, 1), (seed, kind, args, res.stderr)
        if res.returncode:
            assert "reason: " in res.stderr, (seed, kind, args, res.stderr)
    assert every_digest() <= stored_objects(copy), (seed, kind)
    shutil.rmtree(copy)


@pytest.mark.parametrize("seed", range(24))
def test_a_sample_of_page_damage_is_named_and_gc_keeps_every_object(
    store: str, shm_tmp: str, seed: int
) -> None:
    _check(store, shm_tmp, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24, 400))
def test_more_page_damage(store: str, shm_tmp: str, seed: int) -> None:
    _check(store, shm_tmp, seed)
