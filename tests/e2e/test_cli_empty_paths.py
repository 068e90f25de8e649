"""An empty path argument is a usage error, never the working directory.

Python reads '' as '.', so `veloverlay ingest "$SRC"` with SRC unset used to ingest whatever
directory the script ran in (a new ref named after it), `checkout REF "$DEST"` wrote the tree into
an empty working directory, and `import --path ''` recorded the working directory as the ref's
projection point; `--at ''` and `mount ''` were already refused (`usage`). Each case runs in a
working directory that would have been taken, and checks that directory and the store's refs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import veloverlay
from tests.e2e.test_cli import data, failed, ok, velo
from tests.helpers.trees import make_tree, snapshot

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(veloverlay.__file__)))


def _velo_in(cwd: str, store: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "NO_COLOR": "1", "VELO_STORE": store, "PYTHONPATH": _CHECKOUT}
    return subprocess.run(
        [sys.executable, "-m", "veloverlay", "--json", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=300,
    )


@pytest.fixture
def setup(shm_tmp: str) -> tuple[str, str, str]:
    """(store with ref 'proj', its bundle, an empty working directory)."""
    store = os.path.join(shm_tmp, "store")
    src = os.path.join(shm_tmp, "proj")
    make_tree(src, {"README": b"hello\n", "lib/a.txt": b"a\n"})
    ok(velo(store, "ingest", src, "-n", "proj"))
    bundle = os.path.join(shm_tmp, "proj.velo")
    ok(velo(store, "export", "proj", "-o", bundle))
    cwd = os.path.join(shm_tmp, "cwd")
    os.mkdir(cwd)
    return store, bundle, cwd


@pytest.mark.parametrize(
    "args",
    [
        ("ingest", ""),
        ("ingest", "", "--name", "other"),
        ("checkout", "proj", ""),
        ("export", "proj", "-o", ""),
        ("import", ""),
        ("import", "BUNDLE", "--name", "imported", "--path", ""),
        ("umount", ""),
        ("harvest", "--resume", "x", "--set-aside", ""),
        # A path inside a version: '' was its root ('/' names that).
        ("ls", "proj", ""),
        ("cat", "proj", ""),
        ("tiers", "explain", ""),
        ("tiers", "explain", "", "--ref", "proj"),
    ],
    ids=[
        "ingest",
        "ingest-named",
        "checkout",
        "export",
        "import",
        "import-path",
        "umount",
        "set-aside",
        "ls",
        "cat",
        "tiers-explain",
        "tiers-explain-ref",
    ],
)
def test_an_empty_path_is_a_usage_error_not_the_working_directory(
    setup: tuple[str, str, str], args: tuple[str, ...]
) -> None:
    store, bundle, cwd = setup
    make_tree(cwd, {} if args[0] == "checkout" else {"mine.txt": b"the script's own file\n"})
    before = snapshot(cwd)
    refs = data(velo(store, "refs", "--json"))
    p = _velo_in(cwd, store, *(bundle if a == "BUNDLE" else a for a in args))
    err = failed(p, "usage", code=2)
    assert "empty path" in err
    assert snapshot(cwd) == before  # nothing written into the working directory
    assert data(velo(store, "refs", "--json")) == refs  # no ref made or moved
    assert not [n for n in os.listdir(os.path.dirname(cwd)) if n.startswith(".cwd")]


def test_pull_path_empty_is_refused_before_the_registry_is_asked(shm_tmp: str) -> None:
    """pull checks --path before any connection: localhost:1 answers nothing, so any other
    reason than usage means the empty path was let through."""
    store = os.path.join(shm_tmp, "store")
    ok(velo(store, "init"))
    p = _velo_in(shm_tmp, store, "pull", "localhost:1/team/envs:x", "--path", "")
    failed(p, "usage", code=2)


@pytest.mark.parametrize("suffix", ["/", "/.", "//"])
def test_a_file_named_as_a_directory_is_refused_as_the_kernel_does(
    shm_tmp: str, suffix: str
) -> None:
    """`cat REF d/f/` wrote the file and `ls REF d/f/` listed it, where the same path in the
    source tree is ENOTDIR (`cat src/d/f/`: Not a directory). Both now say bad-path; a
    directory named so, and the file without the slash, work as before."""
    store, src = os.path.join(shm_tmp, "store"), os.path.join(shm_tmp, "src")
    make_tree(src, {"d/f": b"hi\n"})
    ok(velo(store, "ingest", src, "-n", "proj"))
    with pytest.raises(NotADirectoryError):
        open(os.path.join(src, "d", "f") + suffix, "rb").close()
    for verb in (["cat"], ["ls"]):
        p = velo(store, "--json", *verb, "proj", "d/f" + suffix)
        failed(p, "bad-path")
        assert json.loads(p.stdout)["reason"] == "bad-path"
    with open(os.path.join(src, "d", "f"), "rb") as f:
        assert velo(store, "cat", "proj", "d/f").stdout == f.read()
    assert [e["path"] for e in data(velo(store, "ls", "--json", "proj", "d" + suffix))] == ["d/f"]


@pytest.mark.parametrize(
    "args",
    [
        ["pull", "127.0.0.1:PORT/x/y:z", "--ca-cert", ""],
        ["pull", "127.0.0.1:PORT/x/y:z", "--authfile", ""],
        ["push", "proj", "127.0.0.1:PORT/x/y", "--ca-cert", ""],
        ["ingest", "SRC", "-n", "other", "--tiers", ""],
    ],
)
def test_an_empty_file_option_is_a_usage_error_not_no_option(shm_tmp: str, args: list[str]) -> None:
    """`--ca-cert ''` was taken for no --ca-cert (the registry asked without the CA meant),
    `--authfile ''` and `--tiers ''` said not-found ("no such credentials file "): each names no
    file, a usage error before any registry is asked or ref made."""
    import socket

    store, src = os.path.join(shm_tmp, "store"), os.path.join(shm_tmp, "src")
    make_tree(src, {"f": b"x\n"})
    ok(velo(store, "ingest", src, "-n", "proj"))
    with socket.socket() as registry:
        registry.bind(("127.0.0.1", 0))
        registry.listen(8)
        registry.setblocking(False)
        port = str(registry.getsockname()[1])
        words = [a.replace("PORT", port).replace("SRC", src) for a in args]
        failed(velo(store, "--json", *words), "usage", code=2)
        with pytest.raises(BlockingIOError):
            registry.accept()
    assert [r["name"] for r in data(velo(store, "refs", "--json"))] == ["proj"]
