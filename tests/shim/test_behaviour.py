"""The projection behaviour suite on the shim backend: {copy, --link} x {root, root-free} x the
overlay suite's operations (tests/session/test_behaviour.py SCENARIOS, imported so the two suites
cannot drift apart).

Each operation runs as a shell script inside a shim session (then committed) and in a plain
directory checked out from the same ref. Checked, for each:
* the committed manifest, checked out, equals the plain directory (bytes, modes, kinds, symlink
  targets, empty dirs; mtimes unless both are "now", in --link mode too: a file renamed or copied
  with its times gets its recorded mtime back, not the proxy's normalised one);
* P0-b: it equals the tree the session's processes last saw (a snapshot the session itself
  printed as its last step), mtimes included;
* fsck is clean.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, checkout_ref, compare_trees, fsck_ok, new_store, sh
from tests.session.test_behaviour import SCENARIOS
from tests.shim._util import load, run_shim, same_as_seen, snapshot_cmd
from tests.shim.snap import snapshot

MODES = [pytest.param("root", id="root"), pytest.param("rootfree", id="rootfree")]
LINKS = [pytest.param(False, id="copy"), pytest.param(True, id="link")]


def _scenario(base: str, link: bool, script: str) -> tuple[list[str], list[str], list[str], int]:
    store, _src = new_store(base, real_modes=True)  # the modes real trees have (issue 15)
    proj = os.path.join(base, "proj")
    plain = os.path.join(base, "plain")
    seen = os.path.join(base, "seen.json")
    checkout_ref(store, "t", plain)
    since = time.time_ns() - 10**9
    res = run_shim(
        store,
        "t",
        ["sh", "-euc", f"cd {proj}; {script}; {snapshot_cmd(proj, seen)}"],
        link=link,
        at=proj,
    )
    sh(script, plain)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    p0b = same_as_seen(load(seen), snapshot(got), link=link)  # before compare_trees opens modes up
    problems = compare_trees(got, plain, since_ns=since)
    assert res.backend == "shim"
    assert not os.path.exists(proj), "the materialised tree is removed after the session"
    return problems, p0b, fsck_ok(store), res.exit_status


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_operation(mode: str, link: bool, name: str) -> None:
    with unpriv_tmpdir() as base:
        problems, p0b, findings, status = as_mode(mode, _scenario, base, link, SCENARIOS[name])
    assert status == 0
    assert not problems, f"{name}: committed tree != plain directory:\n" + "\n".join(problems)
    assert not p0b, f"{name}: committed tree != what the session saw:\n" + "\n".join(p0b)
    assert not findings, findings


def _background(base: str, link: bool) -> tuple[bytes, list[tuple[int, str]], list[str]]:
    store, _src = new_store(base)
    proj = os.path.join(base, "proj")
    script = (
        f"cd {proj}; "
        "( trap 'printf done > bg.txt; exit 0' TERM; printf start > bg.txt; "
        "while :; do printf . >> ticks; sleep 0.05; done ) & sleep 0.3"
    )
    res = run_shim(store, "t", ["sh", "-c", script], link=link, at=proj)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    with open(os.path.join(got, "bg.txt"), "rb") as f:
        data = f.read()
    return data, res.killed, fsck_ok(store)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("link", LINKS)
def test_background_writer_ended_and_harvested(mode: str, link: bool) -> None:
    """A process still writing when the command exits gets SIGTERM (its trap's last write is
    committed) and is reported as killed."""
    with unpriv_tmpdir() as base:
        data, killed, findings = as_mode(mode, _background, base, link)
    assert data == b"done"
    assert killed, "the background writer should be reported"
    assert not findings


def _moved(base: str) -> tuple[list[str], list[str]]:
    import subprocess

    from tests.session.test_behaviour import MOVES, make_moved_src
    from veloverlay.ingest import ingest
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests

    src = os.path.join(base, "src")
    make_moved_src(src)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1, adopt=True)  # (the shim needs the source gone)
    finally:
        m.close()
    plain = os.path.join(base, "plain")
    checkout_ref(store, "t", plain)
    since = time.time_ns() - 10**9
    proj = os.path.join(base, "proj")
    run_shim(store, "t", ["sh", "-euc", f"cd {proj}; {MOVES}"], link=True, at=proj)
    subprocess.run(["sh", "-euc", MOVES], cwd=plain, check=True)
    got = os.path.join(base, "got")
    checkout_ref(store, "t", got)
    return compare_trees(got, plain, since_ns=since, file_mtimes=True), fsck_ok(store)


@pytest.mark.parametrize("mode", MODES)
def test_link_a_moved_file_keeps_its_recorded_mtime(mode: str) -> None:
    """--link: every untouched file is a link to a proxy with the normalised mtime; a file
    renamed or copied with `cp -a` carried that mtime to its new path and was committed with
    it, where a plain directory keeps the file's own. It gets the mtime the view records for
    its content back (the removed path's where two paths share the content)."""
    with unpriv_tmpdir() as base:
        problems, findings = as_mode(mode, _moved, base)
    assert not problems, "committed tree != plain directory:\n" + "\n".join(problems)
    assert not findings, findings
