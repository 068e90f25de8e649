"""Real environments projected and changed in sessions: a venv, a node project, a make build, git.

Packages come from the registries at test time (PyPI, npm). Without them these tests skip, unless
VELO_TEST_MUST_WORK names "network" (CI does). Each scenario runs in a forked child, as root or
after dropping to the unprivileged uid for good (tests/session/_util.py), with the lower form
forced per parameter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import must_work
from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_form_params
from veloverlay import session
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.checkout import checkout
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck

PY = "/usr/bin/python3"  # world-readable, so the unprivileged uid can run the venv too
PACKAGES = ["six", "idna", "markupsafe"]  # markupsafe ships a compiled extension (_speedups)
EXTRA = "packaging"


def _need_network(what: str, ok: bool, why: str) -> None:
    if ok:
        return
    if "network" in must_work() or "all" in must_work():
        pytest.fail(f"VELO_TEST_MUST_WORK names 'network' but {what} is unreachable: {why}")
    pytest.skip(f"{what} unreachable: {why}")


@pytest.fixture(scope="module")
def wheels() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="velo-wheels-", dir="/dev/shm")
    os.chmod(d, 0o755)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "-d",
            d,
            "pip",
            *PACKAGES,
            EXTRA,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    for name in os.listdir(d):
        os.chmod(os.path.join(d, name), 0o644)
    try:
        _need_network("PyPI", p.returncode == 0, p.stderr.strip()[-300:])
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _run(store: Store, ref: str, argv: list[str], **kw: Any) -> session.SessionResult:
    return session.run(store, session.SessionOptions(refs=[ref], **kw), argv)


def _ls(store: Store, ref: str, path: str) -> bool:
    from veloverlay import paths

    m = Manifests(store)
    try:
        with m.read() as txn:
            _r, c = m.resolve(txn, ref)
            return m.lookup(txn, bytes.fromhex(c.root), paths.parse_user_path(path)) is not None
    finally:
        m.close()


def _fsck(store: Store) -> list[str]:
    m = Manifests(store)
    try:
        return [f"{f.kind} {f.what}" for f in fsck(store, m, jobs=1).findings]
    finally:
        m.close()


def make_venv(
    venv: str, wheels: str, packages: list[str], *, home: str | None = None, compile: bool = True
) -> None:
    """A venv from Debian's world-readable Python with `packages` installed offline."""
    subprocess.run([PY, "-m", "venv", "--without-pip", venv], check=True)
    subprocess.run(
        [
            PY,
            "-m",
            "pip",
            "--python",
            f"{venv}/bin/python",
            "install",
            "-q",
            "--no-index",
            "--compile" if compile else "--no-compile",
            "--find-links",
            wheels,
            "pip",
            *packages,
        ],
        check=True,
        env=dict(os.environ, HOME=home) if home is not None else None,
    )


def _venv_scenario(base: str, wheels: str, form: str) -> dict[str, Any]:
    os.environ["VELO_FORCE_LOWER"] = form
    venv = os.path.join(base, "venv")
    site = "lib/python3.11/site-packages"
    make_venv(venv, wheels, PACKAGES, home=base)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, venv, "venv", jobs=1)
    m.close()
    out: dict[str, Any] = {}
    r = _run(
        store,
        "venv",
        [
            f"{venv}/bin/python",
            "-c",
            "import six, idna, markupsafe._speedups as s; assert s.__file__.endswith('.so')",
        ],
    )
    out["import"] = r.exit_status
    r = _run(
        store,
        "venv",
        [f"{venv}/bin/pip", "install", "-q", "--no-index", "--find-links", wheels, EXTRA],
        message="pip install packaging",
    )
    out["pip"] = (r.exit_status, r.commit is not None, r.conflict_ref)
    out["in_ref"] = _ls(store, "venv", f"{site}/{EXTRA}/version.py")
    out["host_untouched"] = not os.path.exists(f"{venv}/{site}/{EXTRA}")
    r = _run(store, "venv", [f"{venv}/bin/python", "-c", f"import {EXTRA}.version"])
    out["fresh_import"] = r.exit_status
    # Projected elsewhere, the venv's baked paths are named; at home, nothing is said.
    elsewhere = _run(store, "venv", ["true"], at=os.path.join(base, "elsewhere"), discard=True)
    out["moved_warning"] = " ".join(elsewhere.warnings)
    out["in_status"] = any(  # `veloverlay status` / `sessions --json` show it too
        "pyvenv.cfg" in w
        for info in session.list_sessions(store)
        if info.id == elsewhere.session_id
        for w in info.warnings
    )
    out["home_warnings"] = _run(store, "venv", ["true"], discard=True).warnings
    out["fsck"] = _fsck(store)
    return out


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_venv(mode: str, form: str, wheels: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _venv_scenario, base, wheels, form)
    assert out["import"] == 0, "the projected venv cannot import its packages"
    assert out["pip"] == (0, True, None), f"pip install in the session: {out['pip']}"
    assert out["in_ref"], "the harvested ref lacks the package pip installed"
    assert out["host_untouched"], "the session wrote into the host's venv"
    assert out["fresh_import"] == 0, "a fresh session cannot import the harvested package"
    assert "pyvenv.cfg" in out["moved_warning"] and "bin/" in out["moved_warning"], out
    assert out["in_status"], "status does not show the relocation warning"
    assert not any("ingest path" in w for w in out["home_warnings"]), out["home_warnings"]
    assert out["fsck"] == []


def _npm_ok() -> tuple[bool, str]:
    if shutil.which("npm") is None or shutil.which("node") is None:
        return False, "node/npm not installed"
    p = subprocess.run(
        ["npm", "view", "is-odd", "version"], capture_output=True, text=True, timeout=120
    )
    return p.returncode == 0, p.stderr.strip()[-300:]


def _node_scenario(base: str, form: str) -> dict[str, Any]:
    os.environ["VELO_FORCE_LOWER"] = form
    proj = os.path.join(base, "proj")
    os.mkdir(proj)
    env = dict(
        os.environ,
        npm_config_update_notifier="false",
        npm_config_fund="false",
        npm_config_audit="false",
    )
    subprocess.run(["npm", "init", "-y"], cwd=proj, check=True, env=env, capture_output=True)
    subprocess.run(
        ["npm", "install", "is-odd@3"], cwd=proj, check=True, env=env, capture_output=True
    )
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, proj, "proj", jobs=1)
    m.close()
    out: dict[str, Any] = {}
    script = "process.chdir(process.argv[1]); require(process.cwd() + '/node_modules/is-odd')"
    out["require"] = _run(store, "proj", ["node", "-e", script, proj]).exit_status
    r = _run(store, "proj", ["sh", "-c", f"cd {proj} && npm install -s left-pad@1.3.0"])
    out["install"] = (r.exit_status, r.commit is not None)
    out["in_ref"] = _ls(store, "proj", "node_modules/left-pad/index.js")
    out["lock_updated"] = _ls(store, "proj", "node_modules/.package-lock.json")
    script2 = "require(process.argv[1] + '/node_modules/left-pad')('x', 3)"
    out["fresh_require"] = _run(store, "proj", ["node", "-e", script2, proj]).exit_status
    out["fsck"] = _fsck(store)
    return out


@pytest.mark.parametrize(
    ("mode", "form"), [p for p in mode_form_params() if p.id.startswith("root-")]
)
def test_node_project(mode: str, form: str) -> None:
    ok, why = _npm_ok()
    _need_network("the npm registry", ok, why)
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _node_scenario, base, form)
    assert out["require"] == 0
    assert out["install"] == (0, True)
    assert out["in_ref"] and out["lock_updated"]
    assert out["fresh_require"] == 0
    assert out["fsck"] == []


MAKEFILE = b"""prog: a.o b.o
\tcc -o prog a.o b.o
%.o: %.c
\tcc -c -o $@ $<
"""


def _make_scenario(base: str, form: str) -> dict[str, Any]:
    os.environ["VELO_FORCE_LOWER"] = form
    src = os.path.join(base, "cproj")
    os.mkdir(src)
    files = {
        "Makefile": MAKEFILE,
        "a.c": b"int b(void);\nint main(void){return b();}\n",
        "b.c": b"int b(void){return 0;}\n",
    }
    old = 1_600_000_000 * 10**9
    for name, data in files.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
        os.utime(os.path.join(src, name), ns=(old, old))
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, src, "c", jobs=1)
    m.close()

    def entry(path: str) -> tuple[bytes, int] | None:
        m = Manifests(store)
        try:
            with m.read() as txn:
                _r, c = m.resolve(txn, "c")
                e = m.lookup(txn, bytes.fromhex(c.root), path.encode())
                return (e.digest, e.mtime_ns) if e else None
        finally:
            m.close()

    out: dict[str, Any] = {}
    out["build"] = _run(store, "c", ["make", "-s", "-C", src]).exit_status
    out["outputs"] = all(entry(p) for p in ("a.o", "b.o", "prog"))
    before = {p: entry(p) for p in ("a.o", "b.o", "prog")}
    out["up_to_date"] = _run(store, "c", ["make", "-q", "-C", src]).exit_status
    r = _run(store, "c", ["sh", "-c", f"echo '/* edit */' >> {src}/a.c && make -s -C {src}"])
    out["rebuild"] = r.exit_status
    after = {p: entry(p) for p in ("a.o", "b.o", "prog")}
    out["a_rebuilt"] = after["a.o"] != before["a.o"] and after["prog"] != before["prog"]
    out["b_kept"] = after["b.o"] == before["b.o"]
    out["fsck"] = _fsck(store)
    return out


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_make_build(mode: str, form: str) -> None:
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.skip("no cc/make")
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _make_scenario, base, form)
    assert out["build"] == 0 and out["outputs"], out
    assert out["up_to_date"] == 0, "make in a second session wanted to rebuild"
    assert out["rebuild"] == 0 and out["a_rebuilt"], out
    assert out["b_kept"], "b.o was rebuilt although b.c did not change"
    assert out["fsck"] == []


def _git_scenario(base: str, form: str) -> dict[str, Any]:
    os.environ["VELO_FORCE_LOWER"] = form
    src = os.path.join(base, "work")
    os.mkdir(src)
    with open(os.path.join(src, "README"), "w") as f:
        f.write("hello\n")
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, src, "g", jobs=1)
    m.close()
    script = (
        f"cd {src} && git init -q && git add README && "
        "git -c user.name=t -c user.email=t@example.com commit -qm first && "
        "echo more >> README && git -c user.name=t -c user.email=t@example.com commit -qam second"
    )
    out: dict[str, Any] = {"session": _run(store, "g", ["sh", "-c", script]).exit_status}
    dest = os.path.join(base, "out")
    m = Manifests(store)
    with m.read() as txn:
        _r, c = m.resolve(txn, "g")
        checkout(store, m, txn, bytes.fromhex(c.root), dest)
    m.close()
    fs = subprocess.run(["git", "-C", dest, "fsck", "--strict"], capture_output=True, text=True)
    out["fsck_git"] = (fs.returncode, fs.stderr[-300:])
    log = subprocess.run(["git", "-C", dest, "log", "--format=%s"], capture_output=True, text=True)
    out["log"] = log.stdout.split()
    out["fsck"] = _fsck(store)
    return out


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_git_repository(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _git_scenario, base, form)
    assert out["session"] == 0
    assert out["fsck_git"][0] == 0, out["fsck_git"]
    assert out["log"] == ["second", "first"]
    assert out["fsck"] == []


def test_two_venvs_share_the_store(
    wheels: str, shm_tmp: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two venvs that differ by one package cost about one venv plus the difference."""
    store = Store.init(os.path.join(shm_tmp, "store"))
    m = Manifests(store)
    sizes = {}
    for name, pkgs in (("a", PACKAGES), ("b", [*PACKAGES, EXTRA])):
        venv = os.path.join(shm_tmp, name)
        make_venv(venv, wheels, pkgs, compile=False)
        sizes[name] = ingest(store, m, venv, name, jobs=1)
    m.close()
    a, b = sizes["a"], sizes["b"]
    extra = b.bytes - a.bytes  # what venv b has on top of venv a
    saving = 1 - (a.new_bytes + b.new_bytes) / (a.bytes + b.bytes)
    with capsys.disabled():
        print(
            f"\ntwo venvs: {a.bytes + b.bytes} bytes ingested, {a.new_bytes + b.new_bytes} "
            f"stored (dedup saving {saving:.0%}); b added {b.new_bytes} bytes for a "
            f"{extra}-byte difference"
        )
    assert b.new_bytes <= extra + 64 * 1024, "the second venv stored far more than its difference"


def _venv_shim_scenario(base: str, wheels: str, link: bool) -> dict[str, Any]:
    """The shim cannot hide a host directory: the venv is adopted (moved aside once stored)
    and the session materialises it at its own path, so its baked paths keep working."""
    venv = os.path.join(base, "venv")
    site = "lib/python3.11/site-packages"
    make_venv(venv, wheels, PACKAGES, home=base)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    res = ingest(store, m, venv, "venv", jobs=1, adopt=True)
    m.close()
    out: dict[str, Any] = {"adopted": res.adopted_to, "gone": not os.path.exists(venv)}
    kw: dict[str, Any] = {"backend": "shim", "link": link}
    out["import"] = _run(
        store, "venv", [f"{venv}/bin/python", "-c", "import six, idna, markupsafe._speedups"], **kw
    ).exit_status
    r = _run(
        store,
        "venv",
        [f"{venv}/bin/pip", "install", "-q", "--no-index", "--find-links", wheels, EXTRA],
        **kw,
    )
    out["pip"] = (r.exit_status, r.commit is not None, r.conflict_ref)
    out["in_ref"] = _ls(store, "venv", f"{site}/{EXTRA}/version.py")
    out["fresh_import"] = _run(
        store, "venv", [f"{venv}/bin/python", "-c", f"import {EXTRA}.version"], **kw
    ).exit_status
    out["fsck"] = _fsck(store)
    return out


@pytest.mark.needs("root")
@pytest.mark.parametrize("link", [False, True], ids=["copy", "link"])
def test_venv_with_the_shim_after_adopt(link: bool, wheels: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode("root", _venv_shim_scenario, base, wheels, link)
    assert out["adopted"] and out["gone"], out
    assert out["import"] == 0
    assert out["pip"] == (0, True, None), out["pip"]
    assert out["in_ref"] and out["fresh_import"] == 0
    assert out["fsck"] == []
