"""POSIX access ACLs at ingest (veloverlay/posixacl.py): a file whose ACL gives its owning group
nothing but names another user shows the mask as its group bits (0640 for `group::---`,
`user:1501:r--`, `mask::r--`); it must be stored with the group bits the ACL gives the owning
group, so a checkout never shows it to a group the source never allowed. The ACLs are written as
the kernel's xattr bytes (`setfacl` is not installed everywhere)."""

from __future__ import annotations

import os
import stat
import struct

import pytest

from tests.helpers.cli import velo_text
from tests.helpers.trees import make_tree, settle_ctimes
from tests.helpers.unpriv import UNPRIV_UID
from tests.ingest.test_ingest import OLD_NS, age
from veloverlay import ns, posixacl
from veloverlay.ingest.pipeline import ingest
from veloverlay.store.tree import Kind
from veloverlay.verbs.repo import Repo

_ANY = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def acl(*entries: tuple[int, int, int]) -> bytes:
    """The kernel's `system.posix_acl_access` bytes for (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def secret_acl(user: int, group: int, other: int) -> bytes:
    """user::`user`, user:1501:r--, group::`group`, mask::r--, other::`other`."""
    return acl(
        (USER_OBJ, user, _ANY),
        (USER, 4, 1501),
        (GROUP_OBJ, group, _ANY),
        (MASK, 4, _ANY),
        (OTHER, other, _ANY),
    )


def mode_at(repo: Repo, ref: str, path: bytes) -> int:
    with repo.m.read() as txn:
        e = repo.m.lookup(txn, repo.resolve_root(ref), path)
        assert e is not None
        if e.kind is Kind.DIR and e.digest is not None:  # a directory: its node says
            return repo.m.get_node(txn, e.digest).mode
    return e.mode


def test_group_bits_are_the_acl_group_entry_and_mask(repo: Repo, shm_tmp: str) -> None:
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"d/secret": b"s", "d/team": b"t", "plain": b"p"})
    secret, team, d = (os.path.join(src, p) for p in ("d/secret", "d/team", "d"))
    os.setxattr(secret, posixacl.ACCESS, secret_acl(6, 0, 0))
    # The owning group may read and write, the mask allows reading only: it reads.
    os.setxattr(team, posixacl.ACCESS, secret_acl(6, 6, 0))
    os.setxattr(d, posixacl.ACCESS, secret_acl(7, 0, 0))  # a directory: rwx--x... as 0750
    os.chmod(os.path.join(src, "plain"), 0o640)
    os.setxattr(src, posixacl.ACCESS, secret_acl(7, 0, 5))  # the top too: 0745 in stat
    # What stat says (the mask as the group bits), which was stored before.
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o740
    age(src)  # old enough for the stat cache to keep what it can
    settle_ctimes(src)
    res = ingest(repo.store, repo.m, src, "acl", jobs=1)
    assert mode_at(repo, "acl", b"d/secret") == 0o600
    assert mode_at(repo, "acl", b"d/team") == 0o640
    assert mode_at(repo, "acl", b"d") == 0o700
    assert mode_at(repo, "acl", b"plain") == 0o640  # no ACL: its mode
    with repo.m.read() as txn:
        assert repo.m.get_node(txn, repo.resolve_root("acl")).mode == 0o705
    assert res.acl_narrowed == 4
    # A re-ingest (the stat cache is warm) keeps the narrowed modes.
    again = ingest(repo.store, repo.m, src, "acl", jobs=1)
    assert again.unchanged
    assert mode_at(repo, "acl", b"d/secret") == 0o600
    # A checkout shows the file to no group.
    out = os.path.join(shm_tmp, "out")
    repo.checkout("acl", out)
    assert stat.S_IMODE(os.stat(os.path.join(out, "d", "secret")).st_mode) == 0o600
    # The ACL removed (ctime moves): the mode is stored as it now is.
    os.removexattr(secret, posixacl.ACCESS)
    os.chmod(secret, 0o640)
    ingest(repo.store, repo.m, src, "acl", jobs=1)
    assert mode_at(repo, "acl", b"d/secret") == 0o640


def test_a_warm_cache_never_takes_the_mask_for_the_group(repo: Repo, shm_tmp: str) -> None:
    """An ACL set on a file the stat cache already holds changes its ctime: read again."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"f": b"x"})
    os.chmod(os.path.join(src, "f"), 0o640)
    age(src)
    settle_ctimes(src)
    ingest(repo.store, repo.m, src, "warm", jobs=1)
    os.setxattr(os.path.join(src, "f"), posixacl.ACCESS, secret_acl(6, 0, 0))
    ingest(repo.store, repo.m, src, "warm", jobs=1)
    assert mode_at(repo, "warm", b"f") == 0o600


def test_narrow_rules() -> None:
    assert posixacl.narrow(0o755, None) == (0o755, False)
    minimal = acl((USER_OBJ, 7, _ANY), (GROUP_OBJ, 5, _ANY), (OTHER, 5, _ANY))
    assert posixacl.narrow(0o755, minimal) == (0o755, False)
    named_group = acl(
        (USER_OBJ, 7, _ANY),
        (GROUP_OBJ, 1, _ANY),
        (GROUP, 7, 1501),
        (MASK, 7, _ANY),
        (OTHER, 4, _ANY),
    )
    assert posixacl.narrow(0o774, named_group) == (0o714, True)
    assert posixacl.narrow(0o6774, named_group) == (0o6714, True)  # setid bits untouched
    assert posixacl.narrow(0o754, b"\x02\x00\x00\x00\x01") == (0o700, True)  # torn: owner only
    assert posixacl.narrow(0o754, struct.pack("<I", 7)) == (0o700, True)  # unknown version


def test_an_unchanged_acl_file_is_not_read_again(repo: Repo, shm_tmp: str) -> None:
    """The stat cache keeps the mode a file's ACL narrowed: a re-ingest of the unchanged tree
    reads no file (and counts it narrowed still); an ACL changed since (its ctime moves, not the
    mode `stat` shows: the mask is the same) is read again and stored as it now is."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"d/secret": b"s", "d/other": b"o", "plain": b"p"})
    secret = os.path.join(src, "d", "secret")
    os.setxattr(secret, posixacl.ACCESS, secret_acl(6, 0, 0))
    age(src)
    first = ingest(repo.store, repo.m, src, "acl", jobs=1)
    assert (first.hashed, first.acl_narrowed) == (3, 1)
    assert mode_at(repo, "acl", b"d/secret") == 0o600
    # The directory changed (a new name), the ACL file did not: only the new file is read.
    with open(os.path.join(src, "d", "new"), "wb") as f:
        f.write(b"n")
    for p in ("d/new", "d"):  # old, as `age` makes them (which would move every ctime)
        os.utime(os.path.join(src, p), ns=(OLD_NS, OLD_NS))
    settle_ctimes(src)
    again = ingest(repo.store, repo.m, src, "acl", jobs=1)
    assert (again.hashed, again.acl_narrowed) == (1, 1)
    assert mode_at(repo, "acl", b"d/secret") == 0o600
    # Nothing changed: not a file read, the tree as it was.
    same = ingest(repo.store, repo.m, src, "acl", jobs=1)
    assert (same.hashed, same.acl_narrowed, same.unchanged) == (0, 1, True)
    # The owning group given read (the mask, hence the mode stat shows, the same): read again.
    before = os.stat(secret)
    os.setxattr(secret, posixacl.ACCESS, secret_acl(6, 4, 0))
    after = os.stat(secret)
    assert after.st_mode == before.st_mode and after.st_ctime_ns != before.st_ctime_ns
    settle_ctimes(src)
    changed = ingest(repo.store, repo.m, src, "acl", jobs=1)
    assert (changed.hashed, changed.acl_narrowed) == (1, 1)
    assert mode_at(repo, "acl", b"d/secret") == 0o640
    # and a chmod (ctime moves again) too: the ACL's mask then is what chmod gave the group
    os.chmod(secret, 0o600)
    settle_ctimes(src)
    ingest(repo.store, repo.m, src, "acl", jobs=1)
    assert mode_at(repo, "acl", b"d/secret") == 0o600


def _readable_as(uid: int, paths: list[str]) -> list[bool]:
    ns.drop_to_user(uid, uid)
    return [os.access(p, os.R_OK) for p in paths]


def test_a_default_acl_at_the_checkout_gives_no_more_than_the_group_bits(
    repo: Repo, shm_tmp: str
) -> None:
    """A checkout into a directory with a default ACL inherits it, as every file made there
    does (README: such a DIR is written into directly). Its named entries are in the ACL's group
    class, bounded by the mask that the stored group bits become: a user the ACL names with
    rwx reads a stored 0640 file and not a stored 0600 one, as the kernel decides."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {"f600": b"a", "f640": b"b", "d/g600": b"c"})
    for p, mode in (("f600", 0o600), ("f640", 0o640), ("d/g600", 0o600), ("d", 0o700)):
        os.chmod(os.path.join(src, p), mode)
    ingest(repo.store, repo.m, src, "co", jobs=1)
    out = os.path.join(shm_tmp, "out")
    os.mkdir(out)
    os.chmod(shm_tmp, 0o755)
    os.chmod(out, 0o755)
    named = UNPRIV_UID
    default = acl(
        (USER_OBJ, 7, _ANY),
        (USER, 7, named),
        (GROUP_OBJ, 7, _ANY),
        (MASK, 7, _ANY),
        (OTHER, 0, _ANY),
    )
    os.setxattr(out, "system.posix_acl_default", default)
    repo.checkout("co", out)
    got = ns.run_in_child(_readable_as, named, [os.path.join(out, p) for p in ("f600", "f640")])
    assert got == [False, True]
    for p, mode in (("f600", 0o600), ("f640", 0o640), ("d", 0o700), ("d/g600", 0o600)):
        assert stat.S_IMODE(os.lstat(os.path.join(out, p)).st_mode) == mode
        assert posixacl.ACCESS in os.listxattr(os.path.join(out, p))  # inherited, masked


@pytest.mark.parametrize("n", [1, 2])
def test_the_cli_counts_the_files_whose_acls_are_not_kept_in_the_numbers_grammar(
    shm_tmp: str, n: int
) -> None:
    """`ingest`'s warning names how many files had an ACL that is not kept: `n` files of the
    source are given one here, and the warning says that number, singular or plural."""
    src = os.path.join(shm_tmp, "src")
    make_tree(src, {f"f{i}": b"x\n" for i in range(3)})
    for i in range(n):
        os.setxattr(os.path.join(src, f"f{i}"), posixacl.ACCESS, secret_acl(6, 0, 0))
    p = velo_text(os.path.join(shm_tmp, "store"), "ingest", src, "-n", "t")
    assert p.returncode == 0, p.stderr
    [line] = [x for x in p.stderr.splitlines() if "POSIX ACLs" in x]
    said = "1 file or directory has" if n == 1 else f"{n} files or directories have"
    assert line.startswith(f"warning: {said} POSIX ACLs, which are not kept: "), line
