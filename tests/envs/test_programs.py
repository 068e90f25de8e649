"""Real programs in sessions: what users run there (Python's site machinery, ...) does in a
session exactly what it does in a plain directory.

Each scenario runs the same shell script in a session (overlay root and root-free, the shim
backend) and in a `cp -a` copy of the source; the committed version, checked out, must equal
that copy (tests/session/_util.py compare_trees), never the product's own output.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, compare_trees, fsck_ok, run_session
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests

PY = "/usr/bin/python3"  # world-readable, so the root-free uid can run it too
SITE = "lib/python3/site-packages"


def _in_session_and_plain(
    base: str, backend: str, setup: str, script: str
) -> tuple[int, int, list[str], list[str]]:
    """`setup` makes the source (ingested as ref "t"); `script` runs in a session of it at
    base/proj and in a plain copy of the source at the same path afterwards (so that paths a
    program writes into files agree). (session status, plain status, differences, fsck)."""
    os.environ["VELO_RUNTIME_DIR"] = os.path.join(base, "runtime")
    os.makedirs(os.environ["VELO_RUNTIME_DIR"], 0o700)
    src, proj, copy = (os.path.join(base, n) for n in ("src", "proj", "copy"))
    os.makedirs(src)
    subprocess.run(["sh", "-euc", setup], cwd=src, check=True)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    subprocess.run(["cp", "-a", src, copy], check=True)
    since = time.time_ns() - 10**9
    res = run_session(store, ["t"], ["sh", "-euc", script], at=proj, backend=backend)
    if os.path.isdir(proj):  # the overlay's empty mount point (the shim removes its tree)
        os.rmdir(proj)
    os.rename(copy, proj)
    plain = subprocess.run(["sh", "-euc", script], cwd=proj).returncode
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return res.exit_status, plain, compare_trees(got, proj, since_ns=since), fsck_ok(store)


# Python path configuration files (`.pth` directly in a site directory: setuptools puts one in
# every venv, editable installs add theirs, and tools append paths to them in place) are code's
# configuration, not PyTorch checkpoints: the default tier rules must keep them writable.
_PTH_SETUP = f"""
mkdir -p {SITE} extra/more
printf 'import os\\n' > {SITE}/distutils-precedence.pth
printf 'X = 1\\n' > extra/more/found_me.py
mkdir -p weights; printf 'not python' > weights/model.pth
"""
_PTH_SCRIPT = f"""
cd {{proj}}
echo "$PWD/extra/more" >> {SITE}/distutils-precedence.pth
{PY} -c "import site; site.addsitedir('{SITE}'); import found_me; assert found_me.X == 1"
"""


@pytest.mark.parametrize(
    ("mode", "backend"),
    [
        pytest.param("root", "overlay", marks=pytest.mark.needs("overlay_root"), id="root"),
        pytest.param(
            "rootfree", "overlay", marks=pytest.mark.needs("overlay_userns"), id="rootfree"
        ),
        pytest.param("rootfree", "shim", id="rootfree-shim"),
    ],
)
def test_a_python_path_file_in_site_packages_takes_an_appended_path(
    mode: str, backend: str
) -> None:
    with unpriv_tmpdir() as base:
        script = _PTH_SCRIPT.format(proj=os.path.join(base, "proj"))
        status, plain, problems, findings = as_mode(
            mode, _in_session_and_plain, base, backend, _PTH_SETUP, script
        )
    assert plain == 0
    assert status == 0, "appending to a site-packages .pth file failed in the session"
    assert not problems, "committed tree != plain directory:\n" + "\n".join(problems)
    assert not findings, findings
