"""Versions: the records of refs, commits and tags, and how a version is named.

A version is named `BASE` or `BASE@{n}` (n commits before BASE), where BASE is, first match wins:
a ref (`NAME`, or `NAME@SESSION` for a session ref), a tag (a named version, kept by gc), or a
commit id or a unique prefix of one (at least `MIN_PREFIX` hex digits). `Versions` is the part of
`Manifests` (manifest.py) that resolves names and keeps tags; it reads through the database
handles and record readers that class provides.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from typing import Any, TypeVar

from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record, field

__all__ = [
    "Ref",
    "Commit",
    "Tag",
    "Versions",
    "REF_RE",
    "MIN_PREFIX",
    "check_ref_name",
    "check_revision",
    "check_tag_name",
    "ref_from",
    "new_lineage",
    "commit_from",
    "tag_from",
    "name_key",
]

REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}(@[A-Za-z0-9._+-]{1,64})?\Z")
_REV_RE = re.compile(r"^(?P<name>[^@]+(?:@(?!\{)[A-Za-z0-9._+-]+)?)(?:@\{(?P<n>\d+)\})?\Z")
_HEX_RE = re.compile(r"^[0-9a-f]+\Z")
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")
MIN_PREFIX = 4  # shortest commit-id prefix accepted (git's minimum too)
_PRUNED = b"pruned:"  # + commit id: in the meta database, a commit `gc --keep` deleted

Txn = Any  # lmdb.Transaction (untyped library)
_R = TypeVar("_R")


class Ref(Record):
    name: str
    head: str  # commit id hex
    path: str | None = None  # the directory it was ingested from (default projection point)
    tiers: list[list[Any]] | None = None
    ingest_root: str | None = None  # the source tree as last ingested: base of re-ingest merges
    # random, given when the ref is made (None: made by an earlier version): a ref deleted and
    # made again under the name is another lineage, whatever its log says or lacks
    lineage: str | None = None

    def to_json(self) -> bytes:
        d = {
            "head": self.head,
            "path": self.path,
            "tiers": self.tiers,
            "ingest_root": self.ingest_root,
        }
        if self.lineage is not None:
            d["lineage"] = self.lineage
        return json.dumps(d, sort_keys=True).encode()


class Commit(Record):
    id: str
    root: str
    parent: str | None
    time_ns: int
    message: str
    session: str | None
    ref: str
    delta: list[Any] = field(default_factory=list)
    delta_count: int = 0
    path: str | None = None  # the ref's projection path as of this version (None: not recorded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "root": self.root,
            "parent": self.parent,
            "time_ns": self.time_ns,
            "message": self.message,
            "session": self.session,
            "ref": self.ref,
            "delta_count": self.delta_count,
            "path": self.path,
        }


class Tag(Record):
    """A named version: a commit that `gc` keeps whatever `--keep` says and the ref does."""

    name: str
    commit: str
    time_ns: int
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "commit": self.commit,
            "time_ns": self.time_ns,
            "message": self.message,
        }


def _digest(d: dict[str, Any], key: str, *, optional: bool = False) -> str | None:
    """A digest field of a stored record, checked: a damaged record must read as damaged, not
    as another version (gc keeps what the records name, and deletes the rest)."""
    v = d.get(key) if optional else d[key]
    if v is None and optional:
        return None
    if not isinstance(v, str) or not _DIGEST_RE.match(v):
        raise ValueError(f"its {key} is not a digest")
    return v


def _typed(d: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    v = d[key] if default is ... else d.get(key, default)
    if not isinstance(v, kind):
        raise ValueError(f"its {key} is not a {getattr(kind, '__name__', kind)}")
    return v


def ref_from(name: str, d: dict[str, Any]) -> Ref:
    """A ref's stored record; ValueError, KeyError or TypeError if it is not a whole one."""
    head = _digest(d, "head")
    assert head is not None
    path = _typed(d, "path", (str, type(None)), None)
    tiers = _typed(d, "tiers", (list, type(None)), None)
    lineage = _typed(d, "lineage", (str, type(None)), None)
    if lineage is not None and not _LINEAGE_RE.fullmatch(lineage):
        raise ValueError("its lineage is not one")
    return Ref(name, head, path, tiers, _digest(d, "ingest_root", optional=True), lineage)


_LINEAGE_RE = re.compile(r"[0-9a-f]{32}")


def new_lineage() -> str:
    """A lineage id for a ref made now (`Ref.lineage`)."""
    return os.urandom(16).hex()


def commit_from(cid: str, d: dict[str, Any]) -> Commit:
    """A commit's stored record (see `ref_from`)."""
    root = _digest(d, "root")
    assert root is not None
    return Commit(
        cid,
        root,
        _digest(d, "parent", optional=True),
        _typed(d, "time_ns", int),
        _typed(d, "message", str),
        _typed(d, "session", (str, type(None))),
        _typed(d, "ref", str),
        _typed(d, "delta", list, []),
        _typed(d, "delta_count", int, 0),
        _typed(d, "path", (str, type(None)), None),
    )


def tag_from(name: str, d: dict[str, Any]) -> Tag:
    """A tag's stored record (see `ref_from`)."""
    commit = _digest(d, "commit")
    assert commit is not None
    return Tag(name, commit, _typed(d, "time_ns", int), _typed(d, "message", str, ""))


_MAX_KEY = 511  # LMDB's longest key


def name_key(name: str) -> bytes | None:
    """The database key of a ref or tag name to look up; None for one no key can be (empty or
    too long: LMDB refuses it with MDB_BAD_VALSIZE), which names nothing. A name that is not
    UTF-8 (surrogate escapes from the command line) keeps its bytes and simply matches none."""
    key = name.encode("utf-8", "surrogateescape")
    return key if 0 < len(key) <= _MAX_KEY else None


_REF_HINT = "ref names use letters, digits and . _ + - (a session ref adds @<session>)"


def check_ref_name(name: str) -> str:
    """`name` if it can be a ref's name; else BAD_REF (before any store is read or written:
    every verb gives the same reason for the same bad name, not not-found for some)."""
    if not REF_RE.match(name):
        raise VeloError(f"invalid ref name '{name}'", reason=Reason.BAD_REF, hint=_REF_HINT)
    return name


def check_revision(spec: str) -> str:
    """`spec` if it can name a version as `resolve` takes it (`BASE` or `BASE@{n}`, BASE a ref's,
    a tag's or a commit id's name: all spelled as ref names); else BAD_REF, as `check_ref_name`
    (an empty spec, `..`, a space, a newline or NUL never names one)."""
    m = _REV_RE.match(spec)
    if m is None or not REF_RE.match(m.group("name")):
        raise VeloError(
            f"invalid version '{spec}'",
            reason=Reason.BAD_REF,
            hint="a version is REF, REF@{n}, REF@SESSION, a tag or a commit id; " + _REF_HINT,
        )
    return spec


def check_tag_name(name: str) -> str:
    """`name` if a tag may be called so (a ref's spelling without `@`); else BAD_NAME: to make
    one (`tag NAME VERSION`) and to delete one (`tag --delete NAME`) alike."""
    if "@" in name or not REF_RE.match(name):
        raise VeloError(
            f"invalid tag name '{name}'",
            reason=Reason.BAD_NAME,
            hint="tag names use letters, digits and . _ + -",
        )
    return name


class Versions:
    """Naming versions and tags; mixed into `Manifests`, which supplies the handles below."""

    _refs: Any
    _commits: Any
    _tags: Any
    _meta: Any

    def record_keys(self, txn: Txn, table: str) -> list[bytes]:
        """The keys of `table` ("refs", "commits" or "tags"), records unread: for `fsck`, which
        reads each on its own and reports every damaged one, not the first."""
        db = {"refs": self._refs, "commits": self._commits, "tags": self._tags}[table]
        if db is None:
            return []
        with txn.cursor(db=db) as cur:
            return [bytes(k) for k in cur.iternext(keys=True, values=False)]

    def get_ref(self, txn: Txn, name: str) -> Ref | None:
        raise NotImplementedError

    def get_commit(self, txn: Txn, cid: str) -> Commit:
        raise NotImplementedError

    def has_commit(self, txn: Txn, cid: str) -> bool:
        raise NotImplementedError

    def _record(self, value: Any, what: str, parse: Callable[[dict[str, Any]], _R]) -> _R:
        """A stored JSON record parsed by `parse` (MANIFEST_CORRUPT if it is not a whole one)."""
        raise NotImplementedError

    def record_pruned(self, txn: Txn, cid: str) -> None:
        """Record that `gc --keep` deleted commit `cid`, a kept commit's parent: the log
        ends there on purpose (a commit missing without this record is damage)."""
        self._pruned_at(txn, cid, put=True)

    def was_pruned(self, txn: Txn, cid: str) -> bool:
        return self._pruned_at(txn, cid, put=False)

    def _pruned_at(self, txn: Txn, cid: str, *, put: bool) -> bool:
        key = _PRUNED + bytes.fromhex(cid)
        if put:
            txn.put(key, b"", db=self._meta)
        return txn.get(key, db=self._meta) is not None

    def resolve(self, txn: Txn, spec: str) -> tuple[Ref, Commit]:
        """A version, as `BASE` or `BASE@{n}` (n commits before BASE), where BASE is, first match
        wins: a ref (`NAME`, or `NAME@SESSION` for a session ref), a tag, or a commit id or a
        unique prefix of one (at least `MIN_PREFIX` hex digits). The ref returned is the one the
        version belongs to (for a tag or a commit id: the ref that made the commit; a detached
        record carrying the commit's path if that ref was deleted)."""
        m = _REV_RE.match(check_revision(spec))
        assert m is not None
        base = m.group("name")
        ref = self.get_ref(txn, base)
        if ref is not None:
            commit = self.get_commit(txn, ref.head)
        else:
            tag = self.get_tag(txn, base)
            if tag is not None:
                commit = self.get_commit(txn, tag.commit)
            elif _HEX_RE.match(base) and len(base) >= MIN_PREFIX:
                commit = self.get_commit(txn, self.commit_by_prefix(txn, base))
            else:
                raise VeloError(
                    f"no ref, tag or commit named '{base}'",
                    reason=Reason.NOT_FOUND,
                    hint="'veloverlay refs' lists the refs, 'veloverlay tag' the tags, "
                    "'veloverlay log REF' the commit ids",
                )
            ref = self._ref_of(txn, commit)
        for _ in range(int(m.group("n") or 0)):
            if commit.parent is None or not self.has_commit(txn, commit.parent):
                raise VeloError(
                    f"{spec}: the log of {ref.name} is shorter (or pruned by gc --keep)",
                    reason=Reason.NOT_FOUND,
                )
            commit = self.get_commit(txn, commit.parent)
        return ref, commit

    def _ref_of(self, txn: Txn, commit: Commit) -> Ref:
        ref = self.get_ref(txn, commit.ref)
        if ref is None:  # the ref was deleted; the version (a tag keeps it) is still readable
            return Ref(commit.ref, commit.id, commit.path)
        return ref

    def commit_by_prefix(self, txn: Txn, prefix: str) -> str:
        """The one commit id starting with `prefix` (hex); NOT_FOUND or an ambiguity error."""
        prefix = prefix.lower()
        if len(prefix) < MIN_PREFIX or not _HEX_RE.match(prefix):
            raise VeloError(
                f"'{prefix}' is not a commit id (at least {MIN_PREFIX} hex digits)",
                reason=Reason.BAD_REF,
            )
        start = bytes.fromhex(prefix[: len(prefix) // 2 * 2])
        found: list[str] = []
        with txn.cursor(db=self._commits) as cur:
            if cur.set_range(start):
                for k in cur.iternext(keys=True, values=False):
                    h = bytes(k).hex()
                    if not h.startswith(prefix[: len(start) * 2]):
                        break
                    if h.startswith(prefix):
                        found.append(h)
                        if len(found) > 5:
                            break
        if not found:
            raise VeloError(
                f"no commit id starts with {prefix}",
                reason=Reason.NOT_FOUND,
                hint="'veloverlay log REF' lists commit ids (gc may have removed old ones)",
            )
        if len(found) > 1:
            raise VeloError(
                f"commit id prefix {prefix} is ambiguous: "
                + ", ".join(f[:16] for f in found[:5])
                + (", ..." if len(found) > 5 else ""),
                reason=Reason.BAD_REF,
                hint="give more digits of the commit id",
            )
        return found[0]

    # -- tags ----------------------------------------------------------------------------------
    def get_tag(self, txn: Txn, name: str) -> Tag | None:
        key = name_key(name)
        if self._tags is None or key is None:
            return None
        v = txn.get(key, db=self._tags)
        if v is None:
            return None
        return self._record(v, f"tag {name}", lambda d: tag_from(name, d))

    def tags(self, txn: Txn) -> list[Tag]:
        if self._tags is None:
            return []
        out = []
        with txn.cursor(db=self._tags) as cur:
            for k in cur.iternext(keys=True, values=False):
                tag = self.get_tag(txn, bytes(k).decode())
                assert tag is not None
                out.append(tag)
        return out

    def put_tag(self, txn: Txn, name: str, commit_id: str, *, message: str = "") -> Tag:
        """Name the version `commit_id`. A tag name may not be a ref's (refs resolve first,
        so the tag could never be read) nor look like a commit id."""
        check_tag_name(name)
        if self.get_ref(txn, name) is not None:
            raise VeloError(f"'{name}' is a ref; a tag needs another name", reason=Reason.EXISTS)
        if _HEX_RE.match(name) and len(name) >= MIN_PREFIX:
            raise VeloError(f"tag name '{name}' looks like a commit id", reason=Reason.BAD_NAME)
        if self.get_tag(txn, name) is not None:
            raise VeloError(
                f"tag '{name}' exists",
                reason=Reason.EXISTS,
                hint="delete it first ('veloverlay tag --delete NAME') to move it",
            )
        if not self.has_commit(txn, commit_id):
            raise VeloError(f"commit {commit_id} is missing", reason=Reason.NOT_FOUND)
        tag = Tag(name, commit_id, time.time_ns(), message)
        d = {"commit": commit_id, "time_ns": tag.time_ns, "message": message}
        txn.put(name.encode(), json.dumps(d, sort_keys=True).encode(), db=self._tags)
        return tag

    def delete_tag(self, txn: Txn, name: str) -> bool:
        key = name_key(check_tag_name(name))
        if self._tags is None or key is None:
            return False
        return bool(txn.delete(key, db=self._tags))
