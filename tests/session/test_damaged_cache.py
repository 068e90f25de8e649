"""A stack record of the layer cache replaced by what is not a regular file (a damaged or
tampered cache): a FIFO, a directory, a symbolic link to /dev/zero. Every verb that reads the
record says so or builds it again; none blocks for ever or reads without end.

Found by planting a FIFO in place of a stack record after a session: `run`, `fsck` and `gc`
blocked in open(2) until killed (`lower/stacks._read_stack`, `lower/check.verify_layers`,
`lower/prune._prune_home` read it with Path.read_text); a directory there failed `run` with a
raw `Errno 21` (the rebuilt record could not be renamed over it)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from tests.helpers.cli import TOP
from tests.helpers.timing import bound
from tests.session._util import new_store, run_session
from veloverlay.session import state


def _limited() -> None:  # a read of /dev/zero without end fails here, not on the machine
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _cli(store: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": TOP, "NO_COLOR": "1", "VELO_STORE": store}
    try:
        return subprocess.run(
            [sys.executable, "-m", "veloverlay", "--json", *args],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=bound(60),
            stdin=subprocess.DEVNULL,
            preexec_fn=_limited,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"veloverlay {' '.join(args)} blocked on a damaged stack record")


def _plant(path: str, kind: str) -> None:
    os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path, 0o644)
    elif kind == "dir":
        os.mkdir(path)
    else:
        os.symlink("/dev/zero", path)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a root session")
@pytest.mark.parametrize("verb", ["run", "fsck", "gc"])
@pytest.mark.parametrize("kind", ["fifo", "dir", "zero-link"])
def test_a_damaged_stack_record_blocks_no_verb(shm_tmp: str, kind: str, verb: str) -> None:
    store, src = new_store(shm_tmp)
    proj = os.path.join(shm_tmp, "proj")
    run_session(store, ["t"], ["true"], at=proj)
    (st,) = list(state.iter_states(store))
    stacks = os.path.join(os.path.dirname(os.path.dirname(st.layers[0])), "stacks")
    (record,) = [os.path.join(stacks, n) for n in os.listdir(stacks)]
    _plant(record, kind)
    out = os.path.join(shm_tmp, "out")
    args = {
        "run": ["run", "t", "--at", proj, "--", "cp", f"{proj}/f1", out],
        "fsck": ["fsck"],
        "gc": ["gc", "--grace", "0"],
    }[verb]
    res = _cli(os.fspath(store.root), *args)
    assert "Traceback" not in res.stderr and "Errno" not in res.stderr, res.stderr
    if verb == "fsck":  # said, with the record named
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert "layer-stack-unreadable" in res.stdout + res.stderr, (res.stdout, res.stderr)
        return
    assert res.returncode == 0, (res.stdout, res.stderr)
    if verb == "run":  # the stack built again: the session saw the source's file
        with open(out, "rb") as got, open(os.path.join(src, "f1"), "rb") as want:
            assert got.read() == want.read()
        with open(record, "rb") as f:  # and its record is a regular file again
            assert b'"layers"' in f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a root session")
@pytest.mark.parametrize(
    ("how", "env"),
    [
        (["--backend", "overlay"], {"VELO_FORCE_LOWER": "links"}),
        (["--backend", "shim", "--link"], {}),
    ],
)
def test_a_fifo_object_copied_into_a_proxy_is_corrupt(
    shm_tmp: str, how: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found with a FIFO in an object's place and the links form (or the shim's --link): the
    proxy's copy (`lower.objects.verified_copy` through `linking.clone_or_copy`) opened the
    object without O_NONBLOCK and `run` blocked until killed."""
    from tests.helpers.trees import unprotect
    from veloverlay.store.digest import hash_fd

    store, src = new_store(shm_tmp)
    fd = os.open(os.path.join(src, "f1"), os.O_RDONLY)
    try:
        h = hash_fd(fd)[0].hex()
    finally:
        os.close(fd)
    obj = os.path.join(os.fspath(store.root), "objects-v2", h[:2], h)
    unprotect(obj)
    os.unlink(obj)
    os.mkfifo(obj, 0o444)
    proj = os.path.join(shm_tmp, "proj")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = _cli(os.fspath(store.root), "run", "t", *how, "--at", proj, "--", "true")
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "reason: object-corrupt" in res.stderr and h in res.stderr, res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a root session")
@pytest.mark.parametrize("kind", ["fifo", "dir", "zero-link"])
def test_a_damaged_store_note_of_the_per_boot_cache_blocks_no_session(
    shm_tmp: str, kind: str
) -> None:
    """The per-boot cache directory's `store` note (the path of the store it serves, read by
    every session start: lower.homes.boot_dir) as a FIFO blocked every session in open(2); a
    directory there failed every session with a raw Errno 21 (the note is renamed over it)."""
    store, src = new_store(shm_tmp)
    proj = os.path.join(shm_tmp, "proj")
    run_session(store, ["t"], ["true"], at=proj)
    (st,) = list(state.iter_states(store))
    note = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(st.layers[0]))), "store")
    with open(note, "rb") as f:  # the per-boot cache's, naming this store
        assert f.read() == os.fsencode(os.path.abspath(store.root))
    _plant(note, kind)
    out = os.path.join(shm_tmp, "out")
    res = _cli(os.fspath(store.root), "run", "t", "--at", proj, "--", "cp", f"{proj}/f1", out)
    assert res.returncode == 0 and "Traceback" not in res.stderr, (res.stdout, res.stderr)
    with open(out, "rb") as got, open(os.path.join(src, "f1"), "rb") as want:
        assert got.read() == want.read()
    with open(note, "rb") as f:  # written again
        assert f.read() == os.fsencode(os.path.abspath(store.root))


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a root session")
def test_another_roots_stack_record_under_this_ones_name_is_not_used(shm_tmp: str) -> None:
    """The stack record of ref `u`'s root copied over the record named for ref `t`'s (a cache
    restored or copied by hand): its layers and their stamps are whole, so `run t` mounted
    u's tree, and fsck checked those layers against the root written inside the record and
    found nothing. A record whose root is not the one its name says is now not used (the
    stack is built again), fsck reports `layer-mismatch` and --repair drops it."""
    import json

    from tests.helpers.trees import make_tree
    from veloverlay.ingest import ingest
    from veloverlay.store.manifest import Manifests

    store, src = new_store(shm_tmp)
    other = os.path.join(shm_tmp, "other")
    make_tree(other, {"f1": b"not t's f1\n", "only-in-u": b"u\n"})
    m = Manifests(store)
    try:
        ingest(store, m, other, "u", jobs=1)
    finally:
        m.close()
    proj = os.path.join(shm_tmp, "proj")
    run_session(store, ["t"], ["true"], at=proj)
    run_session(store, ["u"], ["true"], at=proj)
    sts = list(state.iter_states(store))
    stacks = os.path.join(os.path.dirname(os.path.dirname(sts[0].layers[0])), "stacks")
    records = {}
    for n in os.listdir(stacks):
        with open(os.path.join(stacks, n)) as f:
            records[json.load(f)["root"]] = os.path.join(stacks, n)
    roots = {st.refs[0]: st.roots[0] for st in sts}
    with open(records[roots["u"]], "rb") as f:
        u_record = f.read()

    def copy_over() -> None:
        with open(records[roots["t"]], "wb") as f:
            f.write(u_record)

    copy_over()
    root = os.fspath(store.root)
    repaired = _cli(root, "fsck", "--repair")
    assert repaired.returncode == 1 and not os.path.exists(records[roots["t"]]), repaired
    copy_over()
    checked = _cli(root, "fsck")
    assert checked.returncode == 1, checked
    kinds = {(x["kind"], x["what"]) for x in json.loads(checked.stdout)["findings"]}
    assert kinds == {("layer-mismatch", os.path.basename(records[roots["t"]]))}, kinds
    out = os.path.join(shm_tmp, "out")
    res = _cli(root, "run", "t", "--at", proj, "--", "sh", "-c", f"ls {proj} > {out}")
    assert res.returncode == 0, res.stderr
    with open(out) as f:
        assert f.read().split() == sorted(os.listdir(src)), "run t showed another tree"
    assert _cli(root, "fsck").returncode == 0  # the record built again for t's own root
