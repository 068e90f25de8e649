"""files.force_rmtree: trees with any modes go; an entry that cannot go is one clean OSError."""

from __future__ import annotations

import os
import stat

import pytest

from veloverlay import files, fsflags


def _tree(root: str) -> str:
    """A store-like tree: 0555 and 0000 dirs, 0444 and 0000 files; returns one file's path."""
    leaf = os.path.join(root, "objects-v1", "ab", "cd")
    os.makedirs(leaf)
    for name, mode in (("obj", 0o444), ("secret", 0)):
        with open(os.path.join(leaf, name), "wb") as f:
            f.write(b"x")
        os.chmod(os.path.join(leaf, name), mode)
    os.makedirs(os.path.join(root, "work", "work"))
    os.chmod(os.path.join(root, "work", "work"), 0)
    os.chmod(os.path.join(root, "objects-v1", "ab"), 0o555)
    return os.path.join(leaf, "obj")


def test_any_modes_go(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(tmp_path, "t")
    _tree(root)
    files.force_rmtree(root)
    assert not os.path.lexists(root)


@pytest.mark.needs("chattr")
def test_an_immutable_entry_is_one_clean_error(tmp_path: os.PathLike[str]) -> None:
    """Python >= 3.13's rmtree reports an error raised by the handler as a failure of the
    parent directory: retrying that without a limit recursed until RecursionError (found by
    the matrix box deb13-verity, Python 3.13.5)."""
    root = os.path.join(tmp_path, "t")
    obj = _tree(root)
    fsflags.set_immutable(obj, True)
    try:
        with pytest.raises(PermissionError):
            files.force_rmtree(root)
        assert os.path.exists(obj)
    finally:
        fsflags.set_immutable(obj, False)
    files.force_rmtree(root)
    assert not os.path.lexists(root)
    assert stat.S_IMODE(os.stat(tmp_path).st_mode)  # the parent is untouched
