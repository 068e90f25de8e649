"""Resource limits real hosts have: a tree with more directories than RLIMIT_NOFILE allows open
files checks out and projects (both lower forms, a delta layer after a commit) and harvests."""

from __future__ import annotations

import os
import resource

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_form_params
from veloverlay import session
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.checkout import checkout
from veloverlay.store.manifest import Manifests

DIRS = 600
LIMIT = 256


def _scenario(base: str, form: str) -> dict[str, object]:
    os.environ["VELO_FORCE_LOWER"] = form
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
    src = os.path.join(base, "src")
    for d in range(DIRS):
        os.makedirs(os.path.join(src, f"d{d}", "s"))
        with open(os.path.join(src, f"d{d}", "s", "f"), "w") as f:
            f.write(str(d))
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, src, "big", jobs=1)
    with m.read() as txn:
        n = checkout(store, m, txn, bytes.fromhex(m.resolve(txn, "big")[1].root), base + "/co")
    m.close()
    at = os.path.join(base, "at")
    make = f"cd {at} && for i in $(seq 1 {DIRS}); do mkdir -p new$i/s && echo $i > new$i/s/f; done"
    first = session.run(store, session.SessionOptions(refs=["big"], at=at), ["sh", "-c", make])
    check = (
        f"test $(cat {at}/new{DIRS}/s/f) = {DIRS} && test $(cat {at}/d{DIRS - 1}/s/f) = {DIRS - 1}"
    )
    second = session.run(
        store, session.SessionOptions(refs=["big"], at=at, discard=True), ["sh", "-c", check]
    )
    return {
        "checkout": n,
        "first": first.exit_status,
        "changed": first.changed,
        "second": second.exit_status,
    }


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_more_directories_than_open_files(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _scenario, base, form)
    assert out["checkout"] == DIRS * 3
    assert out["first"] == 0 and out["changed"] >= DIRS, out
    assert out["second"] == 0, "the next session (a delta layer) does not show the harvest"
