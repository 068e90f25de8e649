"""The head of an answer (status line and headers) is held to the low-speed limit as its body is:
the read timeout starts again with every byte, so a registry dripping its headers could hold a
pull or a push for days (h11 reads up to 16 KiB of them). Fake registry:
tests/remote/fake_registry.py."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from tests.remote.fake_registry import FakeRegistry, file_entry, one_dir
from veloverlay.errors import Reason, VeloError
from veloverlay.remote import Options, pull
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo


def test_a_registry_that_drips_its_headers_is_cut_off(fake: FakeRegistry, repo: Repo) -> None:
    root, nodes = one_dir([file_entry(b"f", b"x")])
    fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root)
    stop = threading.Event()
    dripped: list[str] = []

    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if "/manifests/" not in h.path:
            return False
        dripped.append(h.path)
        h.wfile.write(b"HTTP/1.1 200 OK\r\n")
        end = time.monotonic() + 12  # (then it gives up: the old code ended there)
        while not stop.is_set() and time.monotonic() < end:  # a header line, a byte per 50 ms
            try:
                h.wfile.write(b"X")
                h.wfile.flush()
            except OSError:
                break  # the client hung up
            stop.wait(0.05)
        h.close_connection = True
        return True

    fake.hook = hook
    # each read gets a byte well within `timeout`; only the pace can end it
    opts = Options(retries=1, timeout=10, backoff=0.01, low_speed_limit=1000, low_speed_time=0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(VeloError) as ei:
            pull(repo.store, repo.m, fake.remote(), options=opts)
        took = time.monotonic() - t0
    finally:
        stop.set()
    assert ei.value.reason is Reason.REMOTE_UNREACHABLE, ei.value
    assert "too slowly" in ei.value.message
    assert len(dripped) == 2  # cut, retried, cut again
    assert took < 8  # 2 x (0.5 s and a read): far below the 10 s read timeout it ignored
