"""`doctor`'s remote report (veloverlay.remote.check) answers in bounded time whatever the
registries do, and reads the store's notes about remotes without trusting their shape."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import pytest

from tests.helpers.trees import make_tree
from tests.remote.fake_registry import FakeRegistry, Handler
from veloverlay.ingest import ingest
from veloverlay.remote import push
from veloverlay.remote.check import check_remotes
from veloverlay.remote.state import Versions
from veloverlay.verbs.repo import Repo


@pytest.fixture
def fakes() -> Iterator[list[FakeRegistry]]:
    made: list[FakeRegistry] = []
    yield made
    for f in made:
        f.close()


def _note(repo: Repo, notes: dict[str, object]) -> None:
    d = os.path.join(repo.store.root, "remote-v1")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "versions-v1.json"), "w") as f:
        json.dump(notes, f)


def _known(f: FakeRegistry) -> dict[str, object]:
    return {"env": ["team/env", "sha256:" + "0" * 64]}


def test_registries_that_drip_or_page_forever_are_answered_in_bounded_time(
    repo: Repo, fakes: list[FakeRegistry]
) -> None:
    stop = threading.Event()
    drip, hold, pages = FakeRegistry(), FakeRegistry(), FakeRegistry()
    fakes += [drip, hold, pages]
    served = [0]

    def drip_body(h: Handler, method: str) -> bool:  # a byte every second: 1 B/s
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        while not stop.wait(1.0):
            h.wfile.write(b" ")
            h.wfile.flush()
        return True

    def hold_headers(h: Handler, method: str) -> bool:  # headers that never end
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        while not stop.wait(1.0):
            h.wfile.write(b"X-Wait: 1\r\n")
            h.wfile.flush()
        return True

    def endless_pages(h: Handler, method: str) -> bool:  # every tag page links to a new one
        if "/tags/list" not in h.path:
            return False
        served[0] += 1
        link = f'</v2/team/env/tags/list?last=t{served[0]}>; rel="next"'
        h.send(200, b'{"tags":["t"]}', {"Link": link})
        return True

    drip.hook, hold.hook, pages.hook = drip_body, hold_headers, endless_pages
    _note(repo, {f"http://{f.host}": _known(f) for f in (drip, hold, pages)})
    t0 = time.monotonic()
    try:
        rows = check_remotes(repo.store, timeout=2.0, deadline=5.0)
    finally:
        took = time.monotonic() - t0
        stop.set()
    by = {r["registry"]: r for r in rows}
    assert took < 8, took  # was a minute for the drip and thousands of pages for the list
    assert not by[f"http://{drip.host}"]["ok"]
    assert "remote-unreachable" in by[f"http://{drip.host}"]["reason"]
    assert not by[f"http://{hold.host}"]["ok"]
    # (headers are paced as bodies are: cut before the deadline, and said so)
    assert "sends too slowly" in by[f"http://{hold.host}"]["reason"]
    assert by[f"http://{pages.host}"]["ok"] and served[0] == 1, by


def test_notes_of_an_odd_shape_are_reported_not_a_traceback(
    repo: Repo, fakes: list[FakeRegistry]
) -> None:
    f = FakeRegistry()
    fakes.append(f)
    _note(
        repo,
        {
            "h.example:1": ["not", "a", "map"],
            "h.example:2": {"a": [7, "sha256:x"], "b": ["team/x"], "c": "x"},
            f"http://{f.host}": {"a": [7, "d"], "b": ["team/env", "d"]},
        },
    )
    rows = {r["registry"]: r for r in check_remotes(repo.store, timeout=2.0, deadline=5.0)}
    assert rows[f"http://{f.host}"]["ok"], rows
    assert not rows["h.example:1"]["ok"] and "not-found" in rows["h.example:1"]["reason"]


def test_a_push_reads_and_mends_notes_of_an_odd_shape(
    repo: Repo, fakes: list[FakeRegistry], shm_tmp: str
) -> None:
    """The notes are the store's own file, but a damaged one must not stop a push."""
    f = FakeRegistry()
    fakes.append(f)
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"a": b"a\n"})
    ingest(repo.store, repo.m, src, "env", jobs=1)
    _note(repo, {f"http://{f.host}": ["not", "a", "map"]})
    [res] = push(repo.store, repo.m, ["env"], f.remote("v1"))
    assert Versions(repo.store).get(f"http://{f.host}", "env") == ("team/env", res.digest)
