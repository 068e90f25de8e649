"""The Merkle node encoding (tree.py) and manifest names (paths.py): pure, no I/O.

`tree.decode` is the validation of every node read from LMDB or a bundle, so it must be strict:
any byte string either decodes to a node whose re-encoding is byte-identical, or is refused with
MANIFEST_CORRUPT. Names are bytes; `.`, `..`, `/`, NUL, empty and > 255 bytes are refused.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veloverlay import paths
from veloverlay.errors import Reason, VeloError
from veloverlay.store import tree
from veloverlay.store.digest import hash_bytes, node_digest
from veloverlay.store.tree import Entry, Kind, Node

BAD_NAMES = [b"", b".", b"..", b"a/b", b"/", b"/etc", b"a\0b", b"\0", b"x" * 256]
ODD_NAMES = [
    b"-rf",
    b"--",
    b"a b",
    b" ",
    b"new\nline",
    b"\xff\xfe",
    b"\x80abc",
    b"...",
    b".hidden",
    b"x" * 255,
    b"\xff" * 255,
    "é".encode(),
    b"\\",
    b"*?[",
]


def valid_name(n: bytes) -> bool:
    return 0 < len(n) <= 255 and b"/" not in n and b"\0" not in n and n not in (b".", b"..")


names = st.one_of(
    st.sampled_from(ODD_NAMES),
    st.binary(min_size=1, max_size=40).filter(valid_name),
)
modes = st.integers(0, 0o7777)
mtimes = st.integers(-(2**63), 2**63 - 1)
digests = st.binary(min_size=32, max_size=32)
targets = st.binary(min_size=1, max_size=300).filter(lambda t: b"\0" not in t)


@st.composite
def entries(draw: st.DrawFn, name: bytes | None = None) -> Entry:
    n = name if name is not None else draw(names)
    kind = draw(st.sampled_from(list(Kind)))
    if kind is Kind.FILE:
        return Entry(
            n,
            kind,
            draw(modes),
            draw(st.integers(0, 2**64 - 1)),
            draw(mtimes),
            draw(digests),
            b"",
            draw(st.sampled_from([1, 2])),
        )
    if kind is Kind.DIR:
        return Entry(n, kind, digest=draw(digests))
    if kind is Kind.SYMLINK:
        t = draw(targets)
        return Entry(n, kind, draw(modes), len(t), draw(mtimes), b"", t, 0)
    return Entry(n, kind)


@st.composite
def nodes(draw: st.DrawFn) -> tuple[int, int, list[Entry]]:
    ns = draw(st.lists(names, unique=True, max_size=8))
    return draw(modes), draw(mtimes), [draw(entries(n)) for n in ns]


def decode_or_corrupt(data: bytes) -> Node | None:
    """Strictness oracle: decode succeeds only on canonical encodings."""
    try:
        node = tree.decode(data)
    except VeloError as exc:
        assert exc.reason is Reason.MANIFEST_CORRUPT
        return None
    _digest, again = tree.encode(node.mode, node.mtime_ns, node.entries)
    assert again == data, "decode accepted a non-canonical encoding"
    return node


# -- round trip and canonical form -------------------------------------------------------------


@given(nodes())
def test_encode_decode_round_trip(spec: tuple[int, int, list[Entry]]) -> None:
    mode, mtime, ents = spec
    digest, data = tree.encode(mode, mtime, ents)
    node = tree.decode(data)
    assert node == Node(mode, mtime, tuple(sorted(ents, key=lambda e: e.name)))
    assert digest == node_digest(data)
    # The order entries are given in does not matter: the encoding is canonical.
    assert tree.encode(mode, mtime, list(reversed(ents))) == (digest, data)
    for e in ents:
        assert node.lookup(e.name) == e
    assert node.lookup(b"\x00absent") is None


def test_node_digest_is_domain_separated() -> None:
    _d, data = tree.encode(0o755, 0, [])
    assert node_digest(data) != hash_bytes(data)


def test_any_field_change_changes_the_digest() -> None:
    base = Entry(b"f", Kind.FILE, 0o644, 3, 10, b"\1" * 32, b"", 2)
    d0, _ = tree.encode(0o755, 5, [base])
    variants = [
        Entry(b"g", Kind.FILE, 0o644, 3, 10, b"\1" * 32, b"", 2),
        Entry(b"f", Kind.FILE, 0o600, 3, 10, b"\1" * 32, b"", 2),
        Entry(b"f", Kind.FILE, 0o644, 4, 10, b"\1" * 32, b"", 2),
        Entry(b"f", Kind.FILE, 0o644, 3, 11, b"\1" * 32, b"", 2),
        Entry(b"f", Kind.FILE, 0o644, 3, 10, b"\2" * 32, b"", 2),
        Entry(b"f", Kind.FILE, 0o644, 3, 10, b"\1" * 32, b"", 1),
    ]
    seen = {d0}
    for v in variants:
        d, _ = tree.encode(0o755, 5, [v])
        assert d not in seen
        seen.add(d)
    assert tree.encode(0o700, 5, [base])[0] not in seen
    assert tree.encode(0o755, 6, [base])[0] not in seen


# -- strict decoding ---------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"VDN1" + b)))
def test_decode_random_bytes_is_strict(data: bytes) -> None:
    decode_or_corrupt(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nodes(), st.data())
def test_decode_bit_flipped_encodings_is_strict(
    spec: tuple[int, int, list[Entry]], data: st.DataObject
) -> None:
    _d, enc = tree.encode(*spec)
    pos = data.draw(st.integers(0, len(enc) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(enc)
    flipped[pos] ^= 1 << bit
    decode_or_corrupt(bytes(flipped))


@given(nodes(), st.data())
def test_decode_refuses_every_truncation_and_extension(
    spec: tuple[int, int, list[Entry]], data: st.DataObject
) -> None:
    _d, enc = tree.encode(*spec)
    cut = data.draw(st.integers(0, len(enc) - 1))
    with pytest.raises(VeloError) as ei:
        tree.decode(enc[:cut])
    assert ei.value.reason is Reason.MANIFEST_CORRUPT
    with pytest.raises(VeloError) as ei:
        tree.decode(enc + data.draw(st.binary(min_size=1, max_size=8)))
    assert ei.value.reason is Reason.MANIFEST_CORRUPT


@given(nodes(), st.data())
def test_links_agrees_with_decode(spec: tuple[int, int, list[Entry]], data: st.DataObject) -> None:
    """`links` (push's walk over stored nodes) names the same children as a strict decode, and
    a cut or extended encoding still raises MANIFEST_CORRUPT rather than yielding garbage."""
    _d, enc = tree.encode(*spec)
    want = [
        (int(e.kind), e.digest, e.size)
        for e in tree.decode(enc).entries
        if e.kind in (Kind.FILE, Kind.DIR)
    ]
    assert tree.links(enc) == want
    cut = data.draw(st.integers(0, len(enc) - 1))
    for bad in (enc[:cut], enc + data.draw(st.binary(min_size=1, max_size=8))):
        with pytest.raises(VeloError) as ei:
            tree.links(bad)
        assert ei.value.reason is Reason.MANIFEST_CORRUPT


@given(nodes(), st.data())
def test_entry_map_agrees_with_decode(
    spec: tuple[int, int, list[Entry]], data: st.DataObject
) -> None:
    """`entry_map` (what a diff compares) holds each entry's own encoding by name: decoding one
    (`decode_entry`) gives the entry a strict decode gives, the header gives the node's mode
    and mtime (as `decode_attrs` does), and a cut or extended encoding raises MANIFEST_CORRUPT."""
    mode, mtime, _ents = spec
    _d, enc = tree.encode(*spec)
    node = tree.decode(enc)
    got_mode, got_mtime, encoded = tree.entry_map(enc)
    assert (got_mode, got_mtime) == (node.mode, node.mtime_ns) == tree.decode_attrs(enc)
    assert (got_mode, got_mtime) == (mode & 0o7777, mtime)
    assert list(encoded) == [e.name for e in node.entries]
    assert [tree.decode_entry(raw) for raw in encoded.values()] == list(node.entries)
    assert b"".join(encoded.values()) == enc[tree.HEAD_SIZE :]
    cut = data.draw(st.integers(0, len(enc) - 1))
    for bad in (enc[:cut], enc + data.draw(st.binary(min_size=1, max_size=8))):
        with pytest.raises(VeloError) as ei:
            tree.entry_map(bad)
        assert ei.value.reason is Reason.MANIFEST_CORRUPT


@given(nodes(), st.data())
def test_encode_changed_agrees_with_encode(
    spec: tuple[int, int, list[Entry]], data: st.DataObject
) -> None:
    """A node re-encoded from a stored one's entry map with some names put or removed (what
    `apply` writes) is exactly the node `encode` makes of the resulting entries, and the map it
    returns is that node's `entry_map` — with few changes (placed by bisection among many
    untouched entries) and with many."""
    mode, mtime, ents = spec
    crowd = data.draw(st.sampled_from([0, 120]))  # untouched entries: the bisection path
    taken = {e.name for e in ents}
    crowded = [b"\x01crowd%03d" % i for i in range(crowd)]
    ents = ents + [
        Entry(n, Kind.FILE, 0o644, i, 1, bytes(32), b"", 1)
        for i, n in enumerate(crowded)
        if n not in taken
    ]
    _d, enc = tree.encode(mode, mtime, ents)
    _m, _t, old = tree.entry_map(enc)
    by_name = {e.name: e for e in ents}
    old_names = sorted(taken)
    touched = data.draw(
        st.lists(st.one_of(names, st.sampled_from(old_names or [b"x"])), unique=True, max_size=6)
    )
    changed: dict[bytes, Entry | None] = {}
    for n in touched:
        changed[n] = data.draw(st.one_of(st.none(), entries(n)))
        if changed[n] is None:
            by_name.pop(n, None)
        else:
            by_name[n] = changed[n]
    new_mode = data.draw(modes)
    digest, got, new_map = tree.encode_changed(new_mode, mtime, old, changed)
    assert (digest, got) == tree.encode(new_mode, mtime, by_name.values())
    assert new_map == tree.entry_map(got)[2]
    assert list(new_map) == sorted(by_name)


def test_encode_changed_checks_what_it_puts() -> None:
    _d, enc = tree.encode(0o755, 1, [Entry(b"a%d" % i, Kind.MASK) for i in range(120)])
    old = tree.entry_map(enc)[2]
    for bad in (b"..", b"a/b", b"x\0"):
        with pytest.raises(VeloError) as ei:
            tree.encode_changed(0o755, 1, old, {bad: Entry(bad, Kind.MASK)})
        assert ei.value.reason is Reason.BAD_NAME
    with pytest.raises(VeloError) as ei:
        tree.encode_changed(0o755, 1, old, {b"b": Entry(b"c", Kind.MASK)})
    assert ei.value.reason is Reason.MANIFEST_CORRUPT


def test_decode_entry_is_strict() -> None:
    """One entry decoded alone is checked as in a node: a bad name or kind is refused."""
    good = tree.entry_bytes(b"f", Kind.FILE, 1, 0o644, 3, 0, b"\1" * 32)
    assert tree.decode_entry(good) == Entry(b"f", Kind.FILE, 0o644, 3, 0, b"\1" * 32, b"", 1)
    for bad in (
        tree.entry_bytes(b"a/b", Kind.FILE, 1, 0o644, 3, 0, b"\1" * 32),
        tree.entry_bytes(b"f", 9, 1, 0o644, 3, 0, b"\1" * 32),
        tree.entry_bytes(b"f", Kind.FILE, 0, 0o644, 3, 0, b"\1" * 32),
        good[:-1],
        good + b"x",
    ):
        with pytest.raises(VeloError) as ei:
            tree.decode_entry(bad)
        assert ei.value.reason is Reason.MANIFEST_CORRUPT


@given(nodes(), st.data())
def test_stored_shape_agrees_with_decode(
    spec: tuple[int, int, list[Entry]], data: st.DataObject
) -> None:
    """`stored_shape` (what check_closure reads of stored nodes: children, longest name,
    setuid/setgid files) equals the shape of the strictly decoded node, and a cut or extended
    encoding raises MANIFEST_CORRUPT."""
    mode, mtime, ents = spec
    setid = data.draw(st.booleans())
    ents = [e.replace(mode=e.mode | 0o4000) if setid and e.kind is Kind.FILE else e for e in ents]
    _d, enc = tree.encode(mode, mtime, ents)
    assert tree.stored_shape(enc) == tree.shape(tree.decode(enc))
    assert tree.stored_shape(enc)[3] == any(e.kind is Kind.FILE and e.mode & 0o6000 for e in ents)
    cut = data.draw(st.integers(0, len(enc) - 1))
    for bad in (enc[:cut], enc + data.draw(st.binary(min_size=1, max_size=8))):
        with pytest.raises(VeloError) as ei:
            tree.stored_shape(bad)
        assert ei.value.reason is Reason.MANIFEST_CORRUPT


def _raw_node(raw_entries: list[tuple[bytes, int, int, int, int, int, bytes]]) -> bytes:
    """A node encoded by hand, unvalidated: (name, kind, tier, mode, size, mtime, payload)."""
    out = [struct.pack("<4sIqI", b"VDN1", 0o755, 0, len(raw_entries))]
    for name, kind, tier, mode, size, mtime, payload in raw_entries:
        out.append(struct.pack("<H", len(name)) + name)
        out.append(struct.pack("<BBIQqH", kind, tier, mode, size, mtime, len(payload)) + payload)
    return b"".join(out)


D = b"\7" * 32


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_decode_refuses_bad_names(bad: bytes) -> None:
    with pytest.raises(VeloError) as ei:
        tree.decode(_raw_node([(bad, 1, 2, 0o644, 0, 0, D)]))
    assert ei.value.reason is Reason.MANIFEST_CORRUPT


@pytest.mark.parametrize(
    "raw",
    [
        [(b"a", 1, 2, 0, 0, 0, D), (b"a", 1, 2, 0, 0, 0, D)],  # duplicate
        [(b"b", 1, 2, 0, 0, 0, D), (b"a", 1, 2, 0, 0, 0, D)],  # unsorted
        [(b"a", 1, 0, 0, 0, 0, D)],  # file without a tier
        [(b"a", 1, 3, 0, 0, 0, D)],  # unknown tier
        [(b"a", 1, 2, 0o10000, 0, 0, D)],  # file type bits in the mode
        [(b"a", 1, 2, 0, 0, 0, D[:31])],  # short digest
        [(b"a", 2, 0, 0o755, 0, 0, D)],  # dir entry carrying a mode
        [(b"a", 2, 0, 0, 0, 5, D)],  # dir entry carrying an mtime
        [(b"a", 3, 0, 0o777, 5, 0, b"tgt")],  # symlink size != target length
        [(b"a", 3, 0, 0o777, 0, 0, b"")],  # empty symlink target
        [(b"a", 3, 0, 0o777, 3, 0, b"a\0b")],  # NUL in a symlink target
        [(b"a", 3, 1, 0o777, 3, 0, b"abc")],  # symlink with a tier
        [(b"a", 4, 0, 0, 0, 0, D)],  # mask with a payload
        [(b"a", 5, 0, 0, 0, 0, b"")],  # unknown kind
        [(b"a", 0, 0, 0, 0, 0, b"")],  # kind 0
    ],
)
def test_decode_refuses_malformed_entries(
    raw: list[tuple[bytes, int, int, int, int, int, bytes]],
) -> None:
    with pytest.raises(VeloError) as ei:
        tree.decode(_raw_node(raw))
    assert ei.value.reason is Reason.MANIFEST_CORRUPT


def test_decode_refuses_bad_header() -> None:
    good = _raw_node([])
    assert tree.decode(good) == Node(0o755, 0, ())
    for bad in (b"", good[:-1], b"VDN2" + good[4:], struct.pack("<4sIqI", b"VDN1", 0o170755, 0, 0)):
        with pytest.raises(VeloError) as ei:
            tree.decode(bad)
        assert ei.value.reason is Reason.MANIFEST_CORRUPT
    # count says one entry more than there is
    with pytest.raises(VeloError):
        tree.decode(struct.pack("<4sIqI", b"VDN1", 0o755, 0, 1))


# -- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_check_name_refuses(bad: bytes) -> None:
    with pytest.raises(VeloError) as ei:
        paths.check_name(bad)
    assert ei.value.reason is Reason.BAD_NAME
    assert "b'" not in ei.value.message and 'b"' not in ei.value.message  # no Python repr


@pytest.mark.parametrize("good", ODD_NAMES, ids=repr)
def test_check_name_accepts_odd_but_legal_names(good: bytes) -> None:
    assert paths.check_name(good) == good
    assert paths.split(b"dir/" + good) == [b"dir", good]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_encode_refuses_bad_names(bad: bytes) -> None:
    """A node that could never be decoded must not be written in the first place."""
    with pytest.raises(VeloError) as ei:
        tree.encode(0o755, 0, [Entry(bad, Kind.FILE, 0o644, 0, 0, D, b"", 2)])
    assert ei.value.reason is Reason.BAD_NAME


def test_encode_refuses_duplicates() -> None:
    e = Entry(b"a", Kind.MASK)
    with pytest.raises(VeloError):
        tree.encode(0o755, 0, [e, e])


@pytest.mark.parametrize("path", [b"a/../b", b"../x", b"a//b", b"/abs", b"a/./b", b"a/b\0c", b"a/"])
def test_split_refuses_bad_manifest_paths(path: bytes) -> None:
    with pytest.raises(VeloError) as ei:
        paths.split(path)
    assert ei.value.reason is Reason.BAD_NAME


def test_user_paths() -> None:
    assert paths.parse_user_path("/a//b/./c/") == b"a/b/c"
    assert paths.parse_user_path("/") == b""
    assert paths.parse_user_path("") == b""  # the library's root; the command line refuses it
    with pytest.raises(VeloError) as e:
        paths.given_path("")
    assert e.value.reason is Reason.USAGE
    assert paths.parse_user_path(b"\xff/x") == b"\xff/x"
    with pytest.raises(VeloError) as ei:
        paths.parse_user_path("a/../../etc")
    assert ei.value.reason is Reason.BAD_PATH
    assert paths.display(b"") == "/"
    # exactly its bytes (the CLI escapes what it shows, once): never the text `\xff`, which
    # the CLI would show as a name holding a backslash
    assert paths.display(b"\xff") == "\udcff"
