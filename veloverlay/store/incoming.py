"""What a tree from elsewhere must satisfy before a ref may name it: bundle import and remote
pull alike (one rule, so the two ways in cannot drift apart).

- closure: every node reachable from the root is stored or arriving, every file's object is
  stored or arriving, and has the size its entries claim (a 6-byte object claimed as 1 TiB would
  fill the disk at the first copy-up, and a session would show a size its bytes do not have);
- extent: the tree is no deeper, and its paths no longer, than a checkout or a session can make
  (`paths.check_extent`), and it has at most `paths.ENTRIES_MAX` paths (a shared subtree counts
  wherever it is named);
- tier rules as a ref stores them; a commit message is a string of bounded length;
- setuid/setgid bits are dropped from files unless the caller keeps them on purpose (ingest's and
  harvest's policy): a root checkout or session of someone else's tree must not mint a
  setuid-root program.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping

from veloverlay import paths
from veloverlay.errors import Reason, VeloError
from veloverlay.store.cas import Store
from veloverlay.store.manifest import Manifests, Txn, check_ref_name
from veloverlay.store.tree import (
    Kind,
    Node,
    Shape,
    decode,
    shape,
    stored_shape,
    totals_of,
)
from veloverlay.tiers import Rules

SETID = stat.S_ISUID | stat.S_ISGID


MESSAGE_MAX = 4096


def target_ref(name: str) -> str:
    """`name` if a tree from elsewhere may be imported or pulled into it: a valid ref name, and
    not a session's (`REF@<session>`, made by a session's conflict only), as ingest holds it."""
    check_ref_name(name)
    if "@" in name:
        raise VeloError(
            f"cannot import or pull into the session ref '{name}'",
            reason=Reason.BAD_REF,
            hint="name a ref without '@'",
        )
    return name


def message(value: object) -> str:
    """A commit message from elsewhere, as text: a string, at most `MESSAGE_MAX` characters
    (anything else is no message). Control characters are kept; the CLI shows them escaped."""
    return value[:MESSAGE_MAX] if isinstance(value, str) else ""


RULES_MAX = 256  # tier rules: every new file is tested against each (a tiers file has a few)
GLOB_MAX = 1024


def valid_tiers(tiers: object) -> bool:
    """Tier rules as a ref stores them: [[tier 1|2, glob, why], ...] with globs that compile,
    at most `RULES_MAX` rules, globs and reasons at most `GLOB_MAX` and `MESSAGE_MAX` long."""
    if not isinstance(tiers, list) or len(tiers) > RULES_MAX:
        return False
    for rule in tiers:
        if not (
            isinstance(rule, list)
            and len(rule) == 3
            and type(rule[0]) is int  # (True == 1, and 1.0 too)
            and rule[0] in (1, 2)
            and isinstance(rule[1], str)
            and isinstance(rule[2], str)
            and len(rule[1]) <= GLOB_MAX
            and len(rule[2]) <= MESSAGE_MAX
        ):
            return False
    try:
        Rules.from_json(tiers)
    except VeloError:
        return False
    return True


def _object_size(store: Store, arriving: Mapping[bytes, int], digest: bytes) -> int | None:
    size = arriving.get(digest)
    if size is not None:
        return size
    try:
        return os.lstat(store.object_path_b(digest)).st_size
    except FileNotFoundError:
        return None


def check_closure(
    store: Store,
    m: Manifests,
    txn: Txn,
    root: bytes,
    nodes: Mapping[bytes, bytes],
    objects: Mapping[bytes, int],
    bad: Callable[[str], VeloError],
    decoded: dict[bytes, Node] | None = None,
) -> bool:
    """Raise `bad(why)` unless the tree `root` is whole and honest (see the module's text).
    `nodes`: arriving nodes (digest → encoded); `objects`: arriving objects (digest → size).
    Sizes are checked for the files of every arriving node: a stored node's objects were checked
    when it was stored. `decoded`: arriving nodes already decoded (digest → node, from the bytes
    `nodes` holds under that digest); each arriving node of the closure is decoded once, and added
    to it, so that it ends up holding exactly the arriving nodes the tree needs (what to store).
    Returns whether a file of the tree has setuid/setgid bits (`strip_setid` needs no walk
    when none has)."""
    cache: dict[bytes, Node] = {} if decoded is None else decoded

    def node(d: bytes) -> bytes | None:
        return nodes.get(d) or m.raw_node(txn, d)

    def parsed(d: bytes, data: bytes) -> Node:
        got = cache.get(d)
        if got is None:
            got = cache[d] = decode(data)
        return got

    stack, seen = [root], set()
    while stack:
        d = stack.pop()
        if d in seen:
            continue
        seen.add(d)
        found = node(d)
        if found is None:
            raise bad(f"node {d.hex()[:16]} is missing")
        if d not in nodes:
            continue  # stored: its whole closure is stored and was checked
        for e in parsed(d, found).entries:
            if e.kind is Kind.DIR:
                stack.append(e.digest)
            elif e.kind is Kind.FILE:
                have = _object_size(store, objects, e.digest)
                if have is None:
                    raise bad(f"object {e.digest.hex()[:16]} is missing")
                if have != e.size:
                    raise bad(
                        f"{paths.display(e.name)} claims {e.size} bytes, its object "
                        f"{e.digest.hex()[:16]} has {have}"
                    )

    setid = False

    def load(d: bytes) -> Shape:
        nonlocal setid
        got = cache.get(d)
        if got is not None:
            sh = shape(got)
        elif d in nodes:
            sh = shape(parsed(d, nodes[d]))
        else:
            data = m.raw_node(txn, d)
            if data is None:  # checked above; a node cannot vanish inside one read transaction
                raise bad(f"node {d.hex()[:16]} is missing")
            sh = stored_shape(data)  # a stored node: strictly decoded when it was stored
        setid = setid or sh[3]
        return sh

    depth, length, entries, _size = totals_of(root, load)
    try:
        paths.check_extent(depth, length)
    except VeloError as exc:
        raise bad(exc.message) from None
    if entries > paths.ENTRIES_MAX:
        raise bad(
            f"the tree has {entries} paths (its directories name shared subtrees from many "
            f"places); at most {paths.ENTRIES_MAX} are taken"
        )
    return setid


def strip_setid(m: Manifests, txn: Txn, root: bytes, any_setid: bool = True) -> tuple[bytes, int]:
    """(the tree without setuid/setgid bits on its files, how many files had them, counted by
    path). `any_setid=False` (what `check_closure` of this tree returned): none has; no walk.

    Node by node, bottom-up, each distinct node once: a tree from elsewhere can name one
    subtree from many places (40 levels of a directory holding two entries for the same child
    are 2**40 paths in a few KiB), so a walk by path would never end."""
    if not any_setid:
        return root, 0
    done: dict[bytes, tuple[bytes, int]] = {}  # node -> (that node stripped, files stripped)
    stack = [root]
    while stack:
        d = stack[-1]
        if d in done:
            stack.pop()
            continue
        node = m.get_node(txn, d)
        todo = [e.digest for e in node.entries if e.kind is Kind.DIR and e.digest not in done]
        if todo:  # children first (a child is never its own ancestor: digests name content)
            stack.extend(todo)
            continue
        stack.pop()
        entries, count = [], 0
        for e in node.entries:
            if e.kind is Kind.DIR:
                sub, n = done[e.digest]
                count += n
                e = e.replace(digest=sub) if n else e
            elif e.kind is Kind.FILE and e.mode & SETID:
                e = e.replace(mode=e.mode & ~SETID)
                count += 1
            entries.append(e)
        done[d] = (m.put_node(txn, node.mode, node.mtime_ns, entries) if count else d, count)
    return done[root]
