"""Real trees, real habits (issue 15): a C project under git projected in every mode x form with a
fresh per-boot cache, a ref that must not be clobbered by another tree, a venv projected
elsewhere while its source is still in place.

Each scenario runs in a forked child, as root or as the root-free test uid (tests/session/_util),
on trees that uid made itself (tests/envs/realtree.py: 0444 files as in every git repository,
0555 and setgid directories, 0600/0700/0755). Results are compared with a copy of the source
that received the same operations directly, never with the product's own output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from tests.envs.realtree import REAL_MODES, make_project, modes_of
from tests.helpers.trees import diff_snapshots, snapshot
from tests.session._util import as_mode, mode_form_params, use_form
from veloverlay import session
from veloverlay.ingest import ingest
from veloverlay.store.cas import Store
from veloverlay.store.checkout import checkout
from veloverlay.store.manifest import Manifests
from veloverlay.verbs.fsck import fsck

# What a session does to the project, and what the test does to a copy of the source.
_EDIT = (
    "set -e; cd {t}; git fsck --strict --no-progress; git log --format=%s >/dev/null; "
    "cat src/version.h vendor/lib.h private/notes >/dev/null; "
    "echo change >> README; echo new > shared/new; chmod 0640 secrets.env"
)


def _same_edit(root: str) -> None:
    with open(os.path.join(root, "README"), "a") as f:
        f.write("change\n")
    with open(os.path.join(root, "shared/new"), "w") as f:
        f.write("new\n")
    os.chmod(os.path.join(root, "secrets.env"), 0o640)


def _fresh_cache(base: str, form: str) -> str:
    """use_form(form), with a per-boot cache no build has used yet (as after a reboot)."""
    actual = use_form(form)
    if form != "data-only-store":
        cache = os.path.join(base, "runtime")
        os.makedirs(cache, 0o700, exist_ok=True)
        os.environ["VELO_RUNTIME_DIR"] = cache
    return actual


def _git_project_scenario(base: str, form: str) -> dict[str, Any]:
    _fresh_cache(base, form)
    src = os.path.join(base, "app")
    make_project(src)
    expected = os.path.join(base, "expected")
    subprocess.run(["cp", "-a", src, expected], check=True)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, src, "app", jobs=1)
    m.close()
    out: dict[str, Any] = {}
    try:
        res = session.run(
            store, session.SessionOptions(refs=["app"]), ["sh", "-c", _EDIT.format(t=src)]
        )
        out["session"] = (res.exit_status, res.lower_form, res.commit is not None)
    except Exception as exc:  # the failure the user saw: reported, not a crash of the test
        out["session"] = (f"{type(exc).__name__}: {exc}", None, False)
        return out
    out["source_unchanged"] = diff_snapshots(snapshot(src), snapshot(expected))
    _same_edit(expected)
    dest = os.path.join(base, "out")
    m = Manifests(store)
    with m.read() as txn:
        _r, c = m.resolve(txn, "app")
        checkout(store, m, txn, bytes.fromhex(c.root), dest)
    out["fsck"] = [f"{f.kind} {f.what}" for f in fsck(store, m, jobs=1).findings]
    m.close()
    out["diff"] = diff_snapshots(
        snapshot(dest, mtimes=False, dir_mtimes=False),
        snapshot(expected, mtimes=False, dir_mtimes=False),
    )
    out["modes"] = {k: v for k, v in modes_of(dest).items() if k in REAL_MODES}
    out["git_fsck"] = subprocess.run(
        ["git", "-C", dest, "fsck", "--strict"], capture_output=True, text=True
    ).returncode
    out["objects_0444"] = any(
        mode == 0o444 and k.startswith(".git/objects/") for k, mode in modes_of(dest).items()
    )
    return out


@pytest.mark.parametrize(("mode", "form"), mode_form_params(store_layers=True))
def test_git_project_with_real_modes_and_a_fresh_cache(mode: str, form: str, tmp_base: str) -> None:
    out = as_mode(mode, _git_project_scenario, tmp_base, form)
    assert out["session"][0] == 0, out["session"]
    assert out["session"][2], "the session's change was not committed"
    assert out["source_unchanged"] == [], out["source_unchanged"]
    assert out["diff"] == [], out["diff"]
    assert out["objects_0444"] and out["git_fsck"] == 0
    want = {**REAL_MODES, "secrets.env": 0o640}
    assert out["modes"] == want
    assert out["fsck"] == []


@pytest.fixture
def tmp_base() -> Any:
    from tests.helpers.unpriv import unpriv_tmpdir

    with unpriv_tmpdir() as base:
        yield base


def _xattr_whiteout_scenario(base: str) -> dict[str, Any]:
    """Where whiteout devices cannot be made (mknod refused), a delta layer's deletions are
    files marked with an xattr: the file must be writable while the xattr is set."""
    _fresh_cache(base, "data-only")

    def refused(*_a: object, **_k: object) -> None:
        raise PermissionError(1, "mknod refused (simulated)")

    os.mknod = refused  # this forked child only
    src = os.path.join(base, "app")
    os.mkdir(src)  # no 0444 file here: what fails must be the whiteout
    for name in ("README", "main.c"):
        with open(os.path.join(src, name), "w") as f:
            f.write(f"{name}\n")
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, src, "app", jobs=1)
    m.close()
    opts = session.SessionOptions(refs=["app"])
    first = session.run(store, opts, ["sh", "-c", f"cat {src}/README >/dev/null"])
    out: dict[str, Any] = {"first": first.exit_status}
    second = session.run(store, opts, ["rm", f"{src}/README"])
    out["second"] = (second.exit_status, second.commit is not None)
    try:  # the next session stacks the deletion as a delta layer over the cached base
        third = session.run(store, opts, ["sh", "-c", f"test ! -e {src}/README"])
        out["third"] = third.exit_status
    except Exception as exc:
        out["third"] = f"{type(exc).__name__}: {exc}"
    return out


@pytest.mark.parametrize("mode", ["rootfree"])
@pytest.mark.needs("userns", "overlay_userns", "data_only_userns")
def test_xattr_whiteouts_in_a_delta_layer_root_free(mode: str, tmp_base: str) -> None:
    out = as_mode(mode, _xattr_whiteout_scenario, tmp_base)
    assert out == {"first": 0, "second": (0, True), "third": 0}


# -- item 3: a venv projected elsewhere while its source is still in place -------------------

PY = "/usr/bin/python3"  # world-readable: the root-free uid runs the venv too


def _make_venv(venv: str) -> str:
    """A venv with a console script whose #! line names the venv's own path (as pip writes
    them); the script installs a module into the venv's site-packages, as `pip install` would.
    Returns site-packages relative to the venv."""
    subprocess.run([PY, "-m", "venv", "--without-pip", venv], check=True)
    ver = subprocess.run(
        [PY, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tool = os.path.join(venv, "bin", "tool")
    with open(tool, "w") as f:
        f.write(
            f"#!{venv}/bin/python\n"
            "import site\n"
            "open(site.getsitepackages()[0] + '/installed.py', 'w').write('x = 1\\n')\n"
        )
    os.chmod(tool, 0o755)
    return f"lib/python{ver}/site-packages"


def _in_ref(store: Store, ref: str, path: str) -> bool:
    from veloverlay import paths

    m = Manifests(store)
    try:
        with m.read() as txn:
            _r, c = m.resolve(txn, ref)
            return m.lookup(txn, bytes.fromhex(c.root), paths.parse_user_path(path)) is not None
    finally:
        m.close()


def _venv_at_scenario(base: str, backend: str) -> dict[str, Any]:
    _fresh_cache(base, "data-only")
    os.environ.pop("VELO_FORCE_LOWER", None)
    venv = os.path.join(base, "venv")
    site = _make_venv(venv)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, venv, "venv", jobs=1)
    m.close()
    before = snapshot(venv)
    other = os.path.join(base, "other")
    opts = session.SessionOptions(refs=["venv"], at=other, backend=backend)
    out: dict[str, Any] = {}
    try:
        res = session.run(store, opts, [f"{other}/bin/tool"])
        out["run"] = (res.exit_status, res.commit is not None, res.backend)
    except Exception as exc:
        out["run"] = (getattr(getattr(exc, "reason", None), "value", repr(exc)), str(exc))
    out["source_changed"] = diff_snapshots(before, snapshot(venv))
    out["in_ref"] = _in_ref(store, "venv", f"{site}/installed.py")
    return out


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_venv_at_elsewhere_never_changes_its_source(mode: str, tmp_base: str) -> None:
    """The user's case: `run venv --at OTHER -- OTHER/bin/pip install six` installed into the
    original directory (its #! line names it). Inside the overlay session the ingest path shows
    the projection too: the install lands in the session and is harvested."""
    from tests.session._util import MODE_MARKS
    from veloverlay import probe

    caps = probe.detect()
    for feature in MODE_MARKS[mode]:
        if not caps.feature(feature).ok:
            pytest.skip(f"{feature}: {caps.feature(feature).reason}")
    out = as_mode(mode, _venv_at_scenario, tmp_base, "overlay")
    assert out["source_changed"] == [], out["source_changed"]
    assert out["run"] == (0, True, "overlay"), out["run"]
    assert out["in_ref"], "the install was not harvested into the ref"


@pytest.mark.needs("root")
def test_venv_at_elsewhere_with_the_shim_is_refused_before_it_runs(tmp_base: str) -> None:
    out = as_mode("root", _venv_at_scenario, tmp_base, "shim")
    assert out["run"][0] == "baked-paths", out["run"]
    assert f"name its ingest path {tmp_base}/venv" in out["run"][1]
    assert out["source_changed"] == [] and not out["in_ref"]


def _not_found_scenario(base: str) -> dict[str, Any]:
    _fresh_cache(base, "data-only")
    os.environ.pop("VELO_FORCE_LOWER", None)
    venv = os.path.join(base, "venv")
    _make_venv(venv)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    ingest(store, m, venv, "venv", jobs=1, adopt=True)  # the source moves aside
    m.close()
    other = os.path.join(base, "other")
    err = os.path.join(base, "stderr")
    saved = os.dup(2)
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    old_stderr = sys.stderr  # pytest's capture object: the reaper writes through sys.stderr
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    try:
        opts = session.SessionOptions(refs=["venv"], at=other)
        statuses = [
            session.run(store, opts, [f"{other}/bin/tool"]).exit_status,
            session.run(store, opts, ["no-such-command-velo"]).exit_status,
        ]
    finally:
        sys.stderr.close()
        sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)
    with open(err) as f:
        return {"statuses": statuses, "stderr": f.read(), "venv": venv}


@pytest.mark.parametrize("mode", ["root", "rootfree"])
def test_not_found_names_what_is_missing(mode: str, tmp_base: str) -> None:
    """After `--adopt` moved the venv aside, its script's interpreter is what is missing."""
    from tests.session._util import MODE_MARKS
    from veloverlay import probe

    caps = probe.detect()
    for feature in MODE_MARKS[mode]:
        if not caps.feature(feature).ok:
            pytest.skip(f"{feature}: {caps.feature(feature).reason}")
    out = as_mode(mode, _not_found_scenario, tmp_base)
    assert out["statuses"] == [127, 127]
    assert f"its interpreter {out['venv']}/bin/python (named by its #! line)" in out["stderr"]
    assert "no-such-command-velo: command not found (not in PATH)" in out["stderr"]
