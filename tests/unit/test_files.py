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


def test_a_directory_swapped_for_a_link_mid_removal_changes_nothing_it_names(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write a directory being removed can swap a subdirectory for a symbolic link
    between the listing and the descent: the link's target keeps its mode and content."""
    root = os.path.join(tmp_path, "t")
    os.makedirs(os.path.join(root, "d"))
    with open(os.path.join(root, "f"), "w"):
        pass  # not only empty directories: the full walk
    victim = os.path.join(tmp_path, "victim")
    os.makedirs(victim)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("mine\n")
    os.chmod(victim, 0o555)
    real = files._empty_files

    def swap_after_listing(dfd: int) -> list[str]:
        subdirs = real(dfd)
        if "d" in subdirs:
            os.rmdir("d", dir_fd=dfd)
            os.symlink(victim, "d", dir_fd=dfd)
        return subdirs

    monkeypatch.setattr(files, "_empty_files", swap_after_listing)
    with pytest.raises(OSError):
        files.force_rmtree(root)  # the descent refuses the link
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o555
    assert os.listdir(victim) == ["keep"]
    monkeypatch.undo()
    os.chmod(victim, 0o755)
