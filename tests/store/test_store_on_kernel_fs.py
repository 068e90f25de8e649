"""A store path on a kernel interface (/proc, /sys, devpts) or with an overlong name is refused
with a reason, by init and by every verb that opens a store, before anything is made.

Found by `--store /proc/velo init`: a bare os-error "[Errno 2] No such file or directory"
(mkdir in /proc fails as if /proc were missing), and `--store /proc/velo refs` said "run
'veloverlay init'", which cannot work there. A name over 255 bytes was a bare os-error too."""

from __future__ import annotations

import os

import pytest

from tests.helpers.trees import make_tree
from veloverlay.errors import Reason, SysError, VeloError
from veloverlay.ingest.pipeline import ingest
from veloverlay.verbs.repo import Repo

KERNEL = ["/proc/velo", "/proc/sys/velo/deeper", "/sys/velo", "/sys/kernel/velo", "/dev/pts/v"]


@pytest.mark.parametrize("where", KERNEL)
@pytest.mark.parametrize("create", [True, False], ids=["init", "open"])
def test_a_store_on_a_kernel_interface_is_refused_and_named(where: str, create: bool) -> None:
    with pytest.raises(VeloError) as err:
        Repo.open(where, create=create)
    assert err.value.reason is Reason.BAD_PATH, err.value
    assert err.value.message.startswith(f"the store {where} is on "), err.value
    assert "kernel interface" in err.value.message
    assert not os.path.lexists(where)


@pytest.mark.parametrize("create", [True, False], ids=["init", "open"])
def test_a_store_name_over_255_bytes_is_a_syscall_error_naming_the_store(
    shm_tmp: str, create: bool
) -> None:
    where = os.path.join(shm_tmp, "x" * 300, "store")
    with pytest.raises(SysError) as err:
        Repo.open(where, create=create)
    assert err.value.errno == 36 and err.value.filename == where, err.value  # ENAMETOOLONG
    assert os.listdir(shm_tmp) == []


def test_a_checkout_two_levels_below_a_kernel_interface_is_refused(
    repo: Repo, shm_tmp: str
) -> None:
    """The destination's parent is missing too (/proc/a/b): judged by /proc, the nearest
    directory that exists (old code judged only the parent, and let mkdir fail)."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"f": b"x"})
    ingest(repo.store, repo.m, src, "t", jobs=1)
    with pytest.raises(VeloError) as err:
        repo.checkout("t", "/proc/velo-a/velo-b")
    assert err.value.reason is Reason.TARGET_INVALID, err.value
    assert "kernel interface" in err.value.message
