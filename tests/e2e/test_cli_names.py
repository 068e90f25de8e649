"""Every name a human reads back is exactly one name: the escaping is reversible.

Names are shown with control characters as \\xNN (a newline cannot forge a line of `ls`). A
literal backslash was shown as it is, so the file named with the four characters `\\x0a` read
exactly as the file named with a newline (`a\\x0ab` both), and `\\x9b` was both U+009B and the
byte 0x9b of a name that is not UTF-8; `--json` told them apart, the terminal did not. Now a
backslash is doubled and every escape is one byte, in every listing and message: each name
shown decodes to the bytes of one entry of the source tree, and no two entries read alike.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.e2e.test_cli import failed, ok, velo

# pairs that read alike when a backslash is not escaped (the source tree holds them all)
NAMES = [
    b"a\nb",
    b"a\\x0ab",
    b"t\tx",
    b"t\\x09x",
    b"c1-\xc2\x9b",  # U+009B
    b"c1-\x9b",  # the byte 0x9b: no UTF-8
    b"c1-\\x9b",
    b"back\\slash",
    b"back\\\\slash",
]


def unescape(shown: str) -> bytes:
    """The bytes a name shown on a terminal stands for: `\\\\` a backslash, `\\xNN` one byte."""
    out, i = bytearray(), 0
    while i < len(shown):
        if shown[i] != "\\":
            out += shown[i].encode()
            i += 1
        elif shown[i + 1] == "\\":
            out += b"\\"
            i += 2
        else:
            assert shown[i + 1] == "x", shown
            out.append(int(shown[i + 2 : i + 4], 16))
            i += 4
    return bytes(out)


@pytest.fixture
def trees(shm_tmp: str) -> tuple[str, str]:
    """(store, source tree) with ref `h` of the tree NAMES and ref `e` of an empty one."""
    store = os.path.join(shm_tmp, "store")
    src, empty = os.path.join(shm_tmp, "names"), os.path.join(shm_tmp, "empty")
    os.mkdir(src)
    os.mkdir(empty)
    for n in NAMES:
        with open(os.path.join(os.fsencode(src), n), "wb") as f:
            f.write(n + b"\n")
    ok(velo(store, "ingest", src, "-n", "h"))
    ok(velo(store, "ingest", empty, "-n", "e"))
    return store, src


def _lines(p: subprocess.CompletedProcess[bytes]) -> list[str]:
    text = ok(p)
    return [x for x in text.split("\n") if x]


def test_every_listing_shows_each_name_so_that_it_reads_back_exactly(
    trees: tuple[str, str],
) -> None:
    store, src = trees
    real = set(os.listdir(os.fsencode(src)))
    assert len(real) == len(NAMES)
    shown = {
        "ls": [x.split()[-1] for x in _lines(velo(store, "ls", "h"))],
        "ls -r": [x.split()[-1] for x in _lines(velo(store, "ls", "-r", "h"))],
        "diff": [x.split(" ", 1)[1] for x in _lines(velo(store, "diff", "e", "h"))],
        "diff --name-status": [
            x.split("\t", 1)[1] for x in _lines(velo(store, "diff", "--name-status", "e", "h"))
        ],
        "diff --stat": [
            x.split(" | ")[0].strip() for x in _lines(velo(store, "diff", "--stat", "e", "h"))[:-1]
        ],
    }
    for how, names in shown.items():
        decoded = [unescape(n) for n in names]
        assert sorted(decoded) == sorted(real), (how, names)  # old: a\x0ab twice, etc.


def test_a_path_in_a_message_and_in_a_report_reads_back_exactly(
    trees: tuple[str, str], shm_tmp: str
) -> None:
    store, _src = trees
    before = sorted(os.listdir(shm_tmp))
    # an error naming a parent that does not exist, its name like an escaped newline
    missing = os.path.join(shm_tmp, "no\\x0aparent", "d")
    err = failed(velo(store, "--json", "checkout", "h", missing), "not-found")
    [line] = [x for x in err.split("\n") if x.startswith("error: ")]
    assert os.fsencode(missing) in unescape(line), line  # old: read as no<newline>parent
    # the report of a checkout names its destination
    dest = os.path.join(shm_tmp, "out\\x09put")
    [line] = _lines(velo(store, "checkout", "h", dest))
    assert unescape(line) == f"checked out {len(NAMES)} entries into {dest}".encode(), line
    assert sorted(os.listdir(shm_tmp)) == sorted([*before, "out\\x09put"])


def test_a_name_that_is_not_utf8_in_a_message_reads_back_exactly(
    trees: tuple[str, str],
) -> None:
    """A message naming a path that is not UTF-8 shows each such byte once as \\xNN: the byte
    0xff and the four characters `\\xff` are two names, and read as two. The message text was
    escaped before the CLI escaped it again, so both read as `\\\\xff` (a backslash), found by
    projecting real trees with such names. `--json` keeps the byte (\\udcff)."""
    store, _src = trees
    shown = {}
    for raw in (b"gone-\xff", b"gone-\\xff"):
        err = failed(velo(store, "--json", "cat", "h", os.fsdecode(raw)), "not-found")
        [line] = [x for x in err.split("\n") if x.startswith("error: ")]
        shown[raw] = unescape(line.rsplit(" no such path ", 1)[1])
    assert shown == {b"gone-\xff": b"gone-\xff", b"gone-\\xff": b"gone-\\xff"}
    p = velo(store, "--json", "cat", "h", os.fsdecode(b"gone-\xff"))  # no byte sent: stdout
    assert json.loads(p.stdout)["error"].endswith(os.fsdecode(b"gone-\xff"))


def test_the_paths_init_export_and_remove_store_report_read_back_exactly(
    trees: tuple[str, str], shm_tmp: str
) -> None:
    """`init`, `export -o` and `remove-store` named their paths raw in their one-line reports:
    a tab stayed a tab and `\\x0a` (four characters) read as a newline."""
    store, _src = trees
    bundle = os.path.join(shm_tmp, "b\\x0a\tundle.velo")
    [line] = _lines(velo(store, "export", "h", "-o", bundle))
    assert os.path.exists(bundle)
    assert unescape(line.split(" to ", 1)[1]) == os.fsencode(bundle), line  # old: a newline
    other = os.path.join(shm_tmp, "st\\x09o\tre")
    [line] = _lines(velo(other, "init"))
    assert unescape(line) == b"store ready at " + os.fsencode(other), line
    [line] = _lines(velo(other, "remove-store", "--yes"))
    assert not os.path.exists(other)
    assert unescape(line.split(": ", 1)[0]) == b"removed the store at " + os.fsencode(other)


def test_a_name_in_a_message_is_escaped_once(shm_tmp: str) -> None:
    """Messages built with `{name!r}` were escaped by repr() and again by the renderer: a
    backslash showed as four, a name with both quotes as `\\\\'`. Each name given on the
    command line now reads back (`unescape`) to exactly itself between the quotes."""
    store, src = os.path.join(shm_tmp, "store"), os.path.join(shm_tmp, "src")
    os.mkdir(src)
    ok(velo(store, "ingest", src, "-n", "proj"))
    name = "t'\"\\x"  # a quote of each kind and a backslash
    tiers = os.path.join(shm_tmp, "tiers")
    with open(tiers, "w") as f:
        f.write(f"3 {name}\n")
    for args, reason in (
        (["tag", name, "proj"], "bad-name"),
        (["tag", "--delete", name], "bad-name"),
        (["push", "proj", f"127.0.0.1:1/x/y:{name}"], "bad-name"),
        (["pull", "--tls-verify", name, "127.0.0.1:1/x/y:z"], "usage"),
        (["diff", "--session", name], "session-not-found"),
        (["ingest", src, "-n", "proj", "--tiers", tiers], "usage"),
    ):
        err = failed(velo(store, "--json", *args), reason, code=2 if reason == "usage" else 1)
        first = err.splitlines()[0]
        assert (
            f"'{name}'" in unescape(first).decode() or f"'3 {name}'" in unescape(first).decode()
        ), (args, first)
