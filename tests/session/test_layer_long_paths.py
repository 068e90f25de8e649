"""fsck of a cached layer whose paths are near the 4095-byte bound: the layer directory's own
path adds to them, so a walk by full paths fails. Found by ingesting a tree with a 4000-byte
path, running a session of it and `fsck`: a raw `[Errno 36] File name too long` (lower/check.py
walked the layer with os.walk and lstat/getxattr of full paths). It walks by descriptors now,
and still sees what is planted at the bottom of such a layer."""

from __future__ import annotations

import os

import pytest

from tests.helpers.unpriv import unpriv_tmpdir
from tests.session._util import as_mode, mode_form_params, run_session, use_form

_LEVELS = 15  # 15 directories of 253-byte names and a file: a 4000-byte path in the tree


def _deep_source(src: str) -> str:
    """A tree with one 4000-byte path (made by descriptors: no full path is that long here
    either); its directories' path, relative."""
    os.makedirs(src)
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    rel = []
    for i in range(_LEVELS):
        name = f"d{i:02d}" + "x" * 250
        os.mkdir(name, dir_fd=fd)
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd, rel = sub, [*rel, name]
    leaf = "f" * (4000 - sum(len(n) + 1 for n in rel))
    out = os.open(leaf, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, b"deep\n")
    os.close(out)
    os.close(fd)
    return "/".join(rel)


def _fsck_of_a_deep_layer(base: str, form: str) -> dict[str, object]:
    from veloverlay.errors import VeloError
    from veloverlay.ingest import ingest
    from veloverlay.session import state
    from veloverlay.store.cas import Store
    from veloverlay.store.manifest import Manifests
    from veloverlay.verbs.fsck import fsck

    use_form(form)
    src = os.path.join(base, "src")
    rel = _deep_source(src)
    store = Store.init(os.path.join(base, "store"))
    m = Manifests(store)
    try:
        ingest(store, m, src, "t", jobs=1)
    finally:
        m.close()
    run_session(store, ["t"], ["true"], at=os.path.join(base, "at"))
    (st,) = list(state.iter_states(store))
    layer = st.layers[-1]  # the bottom one: the whole tree

    def check() -> tuple[bool, list[tuple[str, str]], str | None]:
        m = Manifests(store)
        try:
            r = fsck(store, m, jobs=1)
        except VeloError as exc:
            return False, [], exc.reason.value
        except OSError as exc:
            return False, [], f"raw {exc.errno}"
        finally:
            m.close()
        return r.ok, [(f.kind, f.what) for f in r.findings], None

    clean = check()
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)  # a file planted at the bottom
    for name in rel.split("/"):
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(os.open("planted", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    return {"clean": clean, "planted": check(), "rel": rel}


@pytest.mark.parametrize(("mode", "form"), mode_form_params())
def test_fsck_checks_a_layer_of_paths_near_the_bound(mode: str, form: str) -> None:
    with unpriv_tmpdir() as base:
        out = as_mode(mode, _fsck_of_a_deep_layer, base, form)
    assert out["clean"] == (True, [], None), out["clean"]
    ok, findings, err = out["planted"]  # type: ignore[misc]
    assert not ok and err is None, out["planted"]
    kinds = {k for k, _what in findings}
    assert kinds == {"layer-mismatch"}, findings
    assert any(what.endswith(f"{out['rel']}/planted") for _k, what in findings), findings
