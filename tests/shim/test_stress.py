"""The failure that sank the earlier shim: 100 concurrent readers (each cat-ing 5,000 projected
files) plus writers must finish, under a bounded time, with every write committed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import checkout_ref, fsck_ok
from tests.shim._util import run_shim
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests

FILES, READERS, WRITERS, LINES = 5000, 100, 10, 50
TIMEOUT = 120.0


def test_100_readers_and_writers_do_not_hang() -> None:
    with unpriv_tmpdir() as base:
        src = Path(base, "src")
        for i in range(FILES):
            d = src / f"d{i % 50:02d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}").write_bytes(b"x" * (i % 300))
        store = Store.init(os.path.join(base, "store"))
        m = Manifests(store)
        try:
            ingest(store, m, os.fspath(src), "t", jobs=2)
        finally:
            m.close()
        proj = os.path.join(base, "proj")
        listing = os.path.join(base, "list")
        script = f"""
cd {proj}
find . -type f > {listing}
i=0; while [ $i -lt {READERS} ]; do xargs cat < {listing} > /dev/null & i=$((i+1)); done
w=0; while [ $w -lt {WRITERS} ]; do
  (k=0; while [ $k -lt {LINES} ]; do echo $k >> w$w.txt; k=$((k+1)); done) &
  w=$((w+1))
done
wait
"""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                res = run_shim(store, "t", ["sh", "-c", script], link=False, at=proj)
                code = res.exit_status
            finally:
                os._exit(code)
        deadline = time.monotonic() + TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError(f"the session hung (> {TIMEOUT}s)")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(status) == 0
        got = os.path.join(base, "got")
        checkout_ref(store, "t", got)
        for w in range(WRITERS):
            lines = Path(got, f"w{w}.txt").read_text().split()
            assert lines == [str(k) for k in range(LINES)]
        assert not fsck_ok(store)
