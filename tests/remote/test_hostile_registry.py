"""A registry that lies or misleads (tests/remote/fake_registry.py): a pull holds a pulled tree to
what an imported bundle must satisfy, never sends the user's credentials to an origin the
registry merely named, and ends in a clear error with a reason, never a traceback, with nothing
named from what it refused (the `repo` fixture runs fsck after each test)."""

from __future__ import annotations

import http.server
import json
import os
import stat
import threading
from collections.abc import Iterator

import pytest

from tests.remote.fake_registry import (
    FakeRegistry,
    deep_tree,
    file_entry,
    one_dir,
    sha,
)
from veloverlay.errors import Reason, VeloError
from veloverlay.remote import Options, pull
from veloverlay.remote.auth import Credentials
from veloverlay.remote.client import Registry
from veloverlay.remote.name import parse_remote
from veloverlay.remote.pack import KIND_OBJECT, PACK_HEADER, Entry, encode_index, index_bytes_max
from veloverlay.remote.version import A_INDEX, A_KIND, INDEX_TYPE
from veloverlay.store import tree
from veloverlay.store.digest import hash_bytes
from veloverlay.verbs.repo import Repo

OPTS = Options(retries=0, timeout=10, backoff=0.01)


CREDS = Credentials("alice", "s3cret-pw", "test-auth.json")


def _refs(repo: Repo) -> list[str]:
    with repo.m.read() as txn:
        return [r.name for r in repo.m.refs(txn)]


def _mode_of(repo: Repo, ref: str, name: bytes) -> int:
    with repo.m.read() as txn:
        r = repo.m.get_ref(txn, ref)
        assert r is not None
        node = repo.m.get_node(txn, bytes.fromhex(repo.m.get_commit(txn, r.head).root))
        e = node.lookup(name)
        assert e is not None
        return e.mode


def _pull_refused(repo: Repo, fake: FakeRegistry, reason: Reason, **kw: object) -> VeloError:
    with pytest.raises(VeloError) as ei:
        pull(repo.store, repo.m, fake.remote(), options=kw.pop("options", OPTS), **kw)  # type: ignore[arg-type]
    assert ei.value.reason is reason, ei.value
    assert _refs(repo) == []  # nothing named
    return ei.value


# -- the tree ------------------------------------------------------------------------------------
def test_setuid_and_setgid_bits_are_dropped_unless_kept(fake: FakeRegistry, repo: Repo) -> None:
    data = b"#!/bin/sh\nid\n"
    root, nodes = one_dir([file_entry(b"suid", data, mode=0o6755), file_entry(b"plain", b"p")])
    fake.serve_version(nodes, {hash_bytes(data): data, hash_bytes(b"p"): b"p"}, root)
    res = pull(repo.store, repo.m, fake.remote(), options=OPTS)
    assert res.stripped_setid == 1
    assert stat.S_IMODE(_mode_of(repo, "env", b"suid")) == 0o755
    assert res.root != root.hex()  # the ref names the stripped tree
    kept = pull(repo.store, repo.m, fake.remote(), name="kept", options=OPTS, keep_setid=True)
    assert kept.stripped_setid == 0
    assert stat.S_IMODE(_mode_of(repo, "kept", b"suid")) == 0o6755


def test_setid_bits_in_a_subtree_the_store_already_holds_are_dropped(
    fake: FakeRegistry, repo: Repo
) -> None:
    """Pull looks for setuid/setgid files in the nodes it does not fetch too (read from the
    store, not walked again): a version whose tree reuses a stored subtree that keeps them
    (pulled with keep_setid) gets them stripped."""
    data = b"#!/bin/sh\nid\n"
    inner, nodes = one_dir([file_entry(b"suid", data, mode=0o4755)])
    fake.serve_version(nodes, {hash_bytes(data): data}, inner, tag="inner")
    pull(repo.store, repo.m, fake.remote("inner"), name="kept", options=OPTS, keep_setid=True)
    outer, outer_nodes = one_dir([tree.Entry(b"sub", tree.Kind.DIR, digest=inner)])
    fake.serve_version({**outer_nodes, **nodes}, {hash_bytes(data): data}, outer)
    res = pull(repo.store, repo.m, fake.remote(), options=OPTS)
    assert res.stripped_setid == 1
    with repo.m.read() as txn:
        root = repo.m.get_node(txn, bytes.fromhex(res.root))
        sub = root.lookup(b"sub")
        assert sub is not None
        e = repo.m.get_node(txn, sub.digest).lookup(b"suid")
        assert e is not None and stat.S_IMODE(e.mode) == 0o755


def test_setid_bits_of_a_subtree_named_from_many_places_are_dropped_node_by_node(
    fake: FakeRegistry, repo: Repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Levels of a directory holding `a` and `b`, both the same child, are 2**levels paths in a
    few nodes: stripping setuid bits path by path took hours for 24 levels (as bundle import).
    40 levels (2**40 paths) are more than any tree is let have: refused before any object is
    fetched, and nothing named."""
    data = b"#!/bin/sh\nid\n"
    reads: list[bytes] = []
    real = repo.m.get_node
    monkeypatch.setattr(repo.m, "get_node", lambda txn, d: reads.append(d) or real(txn, d))
    for levels, tag in ((12, "v1"), (24, "v2"), (40, "v3")):
        d, nodes = one_dir([file_entry(b"suid", data, mode=0o4755)])
        for _ in range(levels):
            pair = [tree.Entry(n, tree.Kind.DIR, digest=d) for n in (b"a", b"b")]
            d, more = one_dir(pair)
            nodes.update(more)
        fake.serve_version(nodes, {hash_bytes(data): data}, d, tag=tag)
        reads.clear()
        if levels == 40:
            with pytest.raises(VeloError) as info:
                pull(repo.store, repo.m, fake.remote(tag), name=tag, options=OPTS)
            assert info.value.reason is Reason.REMOTE_INVALID
            assert "paths" in info.value.message
            with repo.m.read() as txn:
                assert repo.m.get_ref(txn, tag) is None
            continue
        res = pull(repo.store, repo.m, fake.remote(tag), name=tag, options=OPTS)
        assert res.stripped_setid == 2**levels
        assert len(reads) <= 2 * (levels + 1)  # (path by path: 2**(levels + 1))
    with repo.m.read() as txn:
        d = bytes.fromhex(res.root)
        for name in (b"a", b"b") * 12:
            e = real(txn, d).lookup(name)
            assert e is not None
            d = e.digest
        leaf = real(txn, d).lookup(b"suid")
        assert leaf is not None and stat.S_IMODE(leaf.mode) == 0o755


@pytest.mark.parametrize(
    "tiers", [[[True, "a", ""]], [[1.0, "a", ""]], [[1, "[z-a]", ""]], [[2, "a", ""]] * 257]
)
def test_tier_rules_a_ref_cannot_hold_are_invalid(
    fake: FakeRegistry, repo: Repo, tiers: list[list[object]]
) -> None:
    """As a bundle's: the first three were tracebacks (int("True"), int("1.0"), re.error)."""
    root, nodes = one_dir([file_entry(b"f", b"x")])
    fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root, config={"tiers": tiers})
    err = _pull_refused(repo, fake, Reason.REMOTE_INVALID)
    assert "tier rules" in err.message


@pytest.mark.parametrize("lie", ["size", "depth"])
def test_a_tree_refused_is_refused_before_its_objects_are_fetched(
    fake: FakeRegistry, repo: Repo, lie: str
) -> None:
    """The sizes and the depth were checked once every object had arrived: a registry could make
    a pull download all of a version it was going to refuse."""
    data = os.urandom(100_000)
    if lie == "size":
        root, nodes = one_dir([file_entry(b"f", data, size=1 << 40)])
    else:
        root, nodes = deep_tree(400, file_entry(b"f", data))
    fake.serve_version(nodes, {hash_bytes(data): data}, root)
    man = json.loads(fake.manifests["v1"])
    objects = next(
        x["digest"] for x in man["layers"] if x.get("annotations", {}).get(A_KIND) == "objects"
    )
    _pull_refused(repo, fake, Reason.REMOTE_INVALID)
    assert not [p for m, p, _a in fake.seen if m == "GET" and p.endswith(objects)]


@pytest.mark.parametrize("how", ["pushed-as", "name"])
def test_a_version_is_not_pulled_into_a_session_ref(
    fake: FakeRegistry, repo: Repo, how: str
) -> None:
    """As import and ingest: `REF@<session>` is made by a session's conflict only."""
    root, nodes = one_dir([file_entry(b"f", b"x")])
    cfg = {"ref": "env@0123abcd"} if how == "pushed-as" else {}
    fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root, config=cfg)
    kw = {"name": "env@0123abcd"} if how == "name" else {}
    _pull_refused(repo, fake, Reason.BAD_REF, **kw)


def test_an_entry_that_lies_about_its_size_is_refused(fake: FakeRegistry, repo: Repo) -> None:
    data = b"6bytes"
    root, nodes = one_dir([file_entry(b"big", data, size=1 << 40)])
    fake.serve_version(nodes, {hash_bytes(data): data}, root)
    err = _pull_refused(repo, fake, Reason.REMOTE_INVALID)
    assert "claims 1099511627776 bytes" in err.message


def test_a_tree_deeper_than_a_checkout_can_make_is_refused(fake: FakeRegistry, repo: Repo) -> None:
    root, nodes = deep_tree(400, file_entry(b"f", b"x"))
    fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root)
    err = _pull_refused(repo, fake, Reason.REMOTE_INVALID)
    assert "too deep" in err.message  # (not refused as malformed: the nodes are well made)


def test_a_version_that_names_no_ref_needs_a_name(fake: FakeRegistry, repo: Repo) -> None:
    root, nodes = one_dir([file_entry(b"f", b"x")])
    digest = fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root, config={"ref": None})
    with pytest.raises(VeloError) as ei:
        pull(repo.store, repo.m, f"http://{fake.host}/team/env@{digest}", options=OPTS)
    assert ei.value.reason is Reason.USAGE and "--name" in (ei.value.hint or "")
    for bad in (7, ["x"]):
        digest = fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root, config={"ref": bad})
        with pytest.raises(VeloError) as ei:
            pull(repo.store, repo.m, f"http://{fake.host}/team/env@{digest}", options=OPTS)
        assert ei.value.reason is Reason.REMOTE_INVALID
    assert _refs(repo) == []
    res = pull(repo.store, repo.m, f"http://{fake.host}/team/env@{digest}", name="n", options=OPTS)
    assert res.ref == "n"


def test_a_pushed_message_is_kept_as_text_only(fake: FakeRegistry, repo: Repo) -> None:
    root, nodes = one_dir([file_entry(b"f", b"x")])
    fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root, config={"message": {"a": 1}})
    pull(repo.store, repo.m, fake.remote(), options=OPTS)
    with repo.m.read() as txn:
        ref = repo.m.get_ref(txn, "env")
        assert ref is not None
        assert repo.m.get_commit(txn, ref.head).message.endswith(": ")


# -- answers that are not what they should be ----------------------------------------------------
def test_json_nested_past_the_parser_is_invalid(fake: FakeRegistry, repo: Repo) -> None:
    fake.manifests["v1"] = b"[" * 200_000 + b"]" * 200_000
    _pull_refused(repo, fake, Reason.REMOTE_INVALID)


def test_an_endless_redirect_is_invalid(fake: FakeRegistry, repo: Repo) -> None:
    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        h.send(307, headers={"Location": h.path})  # type: ignore[attr-defined]
        return True

    fake.hook = hook
    _pull_refused(repo, fake, Reason.REMOTE_INVALID)


@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip", "br"])
def test_a_body_encoding_is_refused_not_decoded(
    fake: FakeRegistry, repo: Repo, encoding: str
) -> None:
    """Asked for none, a server that compresses anyway could decompress 100 KB into gigabytes."""

    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if "/manifests/" not in h.path:
            return False
        h.send(200, b"\x1f\x8b not gzip", {"Content-Encoding": encoding})  # type: ignore[attr-defined]
        return True

    fake.hook = hook
    err = _pull_refused(repo, fake, Reason.REMOTE_INVALID)
    assert "Content-Encoding" in err.message
    assert all(m == "GET" for m, _p, _a in fake.seen)


def test_a_body_cut_short_is_fetched_again(fake: FakeRegistry, repo: Repo) -> None:
    root, nodes = one_dir([file_entry(b"f", b"x")])
    fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root)
    cuts = []

    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if "/manifests/" in h.path and not cuts:
            cuts.append(h.path)
            h.send_response(200)
            h.send_header("Content-Length", "100000")
            h.end_headers()
            h.wfile.write(b'{"schemaVersion"')
            h.close_connection = True
            return True
        return False

    fake.hook = hook
    res = pull(repo.store, repo.m, fake.remote(), options=Options(retries=2, backoff=0.01))
    assert cuts and res.commit is not None


def test_a_registry_that_drips_is_cut_off_and_fetched_again(fake: FakeRegistry, repo: Repo) -> None:
    """The read timeout starts again with every byte: a registry sending a byte every 50 ms
    would hold a pull for as long as it likes. Below low_speed_limit over low_speed_time the
    transfer is cut (and retried, as any transport error)."""
    data = os.urandom(4096)
    root, nodes = one_dir([file_entry(b"f", data)])
    fake.serve_version(nodes, {hash_bytes(data): data}, root)
    man = json.loads(fake.manifests["v1"])
    pack = next(
        x["digest"] for x in man["layers"] if x.get("annotations", {}).get(A_KIND) == "objects"
    )
    drips: list[str] = []
    stop = threading.Event()

    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if method != "GET" or not h.path.endswith(pack) or len(drips) >= 1:
            return False
        drips.append(h.path)
        body = fake.blobs[pack]
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            try:
                h.wfile.write(body[i : i + 1])
            except OSError:
                break  # the client hung up
            if stop.wait(0.05):
                break
        h.close_connection = True
        return True

    fake.hook = hook
    slow = Options(retries=0, timeout=10, backoff=0.01, low_speed_limit=1000, low_speed_time=0.3)
    try:
        err = _pull_refused(repo, fake, Reason.REMOTE_UNREACHABLE, options=slow)
        assert "too slowly" in err.message and drips
        drips.clear()
        res = pull(repo.store, repo.m, fake.remote(), options=slow.replace(retries=1))
        assert len(drips) == 1 and res.objects_fetched == 1  # cut, then fetched again whole
    finally:
        stop.set()


# -- credentials ---------------------------------------------------------------------------------
def test_a_realm_that_is_not_a_url_is_an_auth_error(fake: FakeRegistry, repo: Repo) -> None:
    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        h.send(401, headers={"WWW-Authenticate": 'Bearer realm="http://[::1",service="x"'})  # type: ignore[attr-defined]
        return True

    fake.hook = hook
    _pull_refused(repo, fake, Reason.REMOTE_AUTH)


def test_a_token_answer_that_is_not_an_object_is_an_auth_error(
    fake: FakeRegistry, repo: Repo
) -> None:
    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if h.path.startswith("/token"):
            h.send(200, b"[]")  # type: ignore[attr-defined]
        else:
            realm = f'Bearer realm="http://{fake.host}/token"'
            h.send(401, headers={"WWW-Authenticate": realm})  # type: ignore[attr-defined]
        return True

    fake.hook = hook
    _pull_refused(repo, fake, Reason.REMOTE_AUTH)


@pytest.fixture
def other() -> Iterator[FakeRegistry]:
    """Another origin (same address, other port): a storage front end, or an attacker."""
    f = FakeRegistry()
    yield f
    f.close()


def _asks_basic(h: http.server.BaseHTTPRequestHandler) -> bool:
    if "Authorization" in h.headers:
        return False
    h.send(401, headers={"WWW-Authenticate": 'Basic realm="r"'})  # type: ignore[attr-defined]
    return True


def test_a_redirect_target_that_asks_for_credentials_gets_none(
    fake: FakeRegistry, other: FakeRegistry, repo: Repo
) -> None:
    root, nodes = one_dir([file_entry(b"f", b"x")])
    fake.serve_version(nodes, {hash_bytes(b"x"): b"x"}, root)

    def front(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if h.path.startswith("/token"):
            h.send(200, b'{"token":"t"}')  # type: ignore[attr-defined]
        else:
            realm = f'Bearer realm="http://{other.host}/token"'
            h.send(401, headers={"WWW-Authenticate": realm})  # type: ignore[attr-defined]
        return True

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if _asks_basic(h):
            return True
        if "/blobs/" in h.path:  # every blob "on a CDN" that wants credentials of its own
            h.send(307, headers={"Location": f"http://{other.host}/cdn{h.path}"})  # type: ignore[attr-defined]
            return True
        return False

    fake.hook, other.hook = registry, front
    err = _pull_refused(
        repo, fake, Reason.REMOTE_AUTH, options=Options(retries=0, credentials=CREDS)
    )
    assert other.host.split(":")[1] in err.message
    assert other.seen and all(auth == "" for _m, _p, auth in other.seen)
    assert any(auth.startswith("Basic ") for _m, _p, auth in fake.seen)  # the registry's own


def test_links_and_locations_to_another_origin_carry_no_credentials(
    fake: FakeRegistry, other: FakeRegistry
) -> None:
    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if _asks_basic(h):
            return True
        if "/tags/list" in h.path:
            link = f'<http://{other.host}/v2/team/env/tags/list?n=1>; rel="next"'
            h.send(200, b'{"tags":["a"]}', {"Link": link})  # type: ignore[attr-defined]
            return True
        if method == "POST":
            h.send(202, headers={"Location": f"http://{other.host}/upload/1"})  # type: ignore[attr-defined]
            return True
        return False

    def elsewhere(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        n = int(h.headers.get("Content-Length") or 0)
        h.rfile.read(n)
        if method == "PUT":
            h.send(201)  # type: ignore[attr-defined]
        else:
            h.send(200, json.dumps({"tags": ["b"]}).encode())  # type: ignore[attr-defined]
        return True

    fake.hook, other.hook = registry, elsewhere
    opts = Options(retries=0, credentials=CREDS)
    with Registry(parse_remote(fake.remote()), opts, push=True) as reg:
        assert reg.tags() == ["a", "b"]
        reg.upload_blob(sha(b"x"), 1, lambda: b"x")
    assert [m for m, _p, _a in other.seen] == ["GET", "PUT"]
    assert all(auth == "" for _m, _p, auth in other.seen)


def test_a_tag_list_that_links_to_itself_ends(fake: FakeRegistry) -> None:
    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        h.send(200, b'{"tags":[]}', {"Link": f"<{h.path}>; rel=next"})  # type: ignore[attr-defined]
        return True

    fake.hook = registry
    with Registry(parse_remote(fake.remote()), OPTS) as reg, pytest.raises(VeloError) as ei:
        reg.tags()
    assert ei.value.reason is Reason.REMOTE_ERROR and "pages" in ei.value.message


def test_the_cli_shows_a_registrys_control_characters_escaped(
    fake: FakeRegistry, shm_tmp: str
) -> None:
    from tests.helpers.cli import velo

    evil = "\x1b]0;owned\x07\x1b[2J\x9b31m"
    body = json.dumps({"errors": [{"code": "DENIED", "message": evil}]}).encode()

    def registry(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        h.send(418, body)  # type: ignore[attr-defined]
        return True

    fake.hook = registry
    r = velo(f"{shm_tmp}/store", "pull", fake.remote())
    err = r.stderr.decode()
    assert r.returncode != 0 and "error:" in err
    assert "\x1b" not in err and "\x07" not in err and "\x9b" not in err
    assert "\\x1b]0;owned\\x07" in err


def test_a_pack_listed_twice_with_overlapping_indexes_is_invalid(
    fake: FakeRegistry, repo: Repo
) -> None:
    # Two indexes of one pack blob: the second names a third file's object over the bytes of
    # the first two. Read as one list, the entries overlap (the read position would go back).
    a, b, c = b"A" * 100, b"B" * 100, b"C" * 100
    root, nodes = one_dir([file_entry(b"a", a), file_entry(b"b", b), file_entry(b"c", c)])
    fake.serve_version(nodes, {hash_bytes(a): a, hash_bytes(b): b}, root)
    man = json.loads(fake.manifests["v1"])
    pack = next(x for x in man["layers"] if x.get("annotations", {}).get(A_KIND) == "objects")
    other = Entry(KIND_OBJECT, hash_bytes(c), len(PACK_HEADER) + 50, 100)
    idx = encode_index([other])
    man["layers"].append(
        dict(pack, annotations=dict(pack["annotations"], **{A_INDEX: fake.put(idx)}))
    )
    man["layers"].append({"mediaType": INDEX_TYPE, "digest": sha(idx), "size": len(idx)})
    fake.manifests["v1"] = json.dumps(man).encode()
    err = _pull_refused(repo, fake, Reason.REMOTE_INVALID)
    assert "listed twice" in err.message


def test_indexes_that_together_hold_too_many_entries_are_refused_unread(
    fake: FakeRegistry, repo: Repo
) -> None:
    """Each index is bounded (4,000,000 entries); a version naming a thousand full ones made a
    pull read and hold all of them (about 150 bytes of memory per entry). The descriptors'
    sizes are checked together before any index is fetched."""
    data = b"x"
    root, nodes = one_dir([file_entry(b"x", data)])
    fake.serve_version(nodes, {hash_bytes(data): data}, root)
    man = json.loads(fake.manifests["v1"])
    pack = next(x for x in man["layers"] if x.get("annotations", {}).get(A_KIND) == "objects")
    half = index_bytes_max(1) // 2  # three such indexes: 1.5 times the bound
    for i in range(3):
        dig = sha(b"index %d" % i)
        fake.blobs[dig] = b"never read"  # served, so only the check can stop the fetch
        man["layers"].append(
            dict(
                pack,
                digest=sha(b"pack %d" % i),
                annotations=dict(pack["annotations"], **{A_INDEX: dig}),
            )
        )
        man["layers"].append({"mediaType": INDEX_TYPE, "digest": dig, "size": half})
    fake.manifests["v1"] = json.dumps(man).encode()
    err = _pull_refused(repo, fake, Reason.REMOTE_INVALID)
    assert "entries together" in err.message
    assert not [p for _m, p, _a in fake.seen if "sha256:" in p and sha(b"index 0") in p]


def test_a_registry_without_tls_named_as_https_gets_the_http_hint(
    fake: FakeRegistry, repo: Repo
) -> None:
    with pytest.raises(VeloError) as ei:
        pull(repo.store, repo.m, f"https://{fake.host}/team/env:v1", options=OPTS)
    assert ei.value.reason is Reason.REMOTE_TLS, ei.value
    assert f"http://{fake.host}/" in (ei.value.hint or "")


# -- answers without end -------------------------------------------------------------------------
_ENDLESS = 96 << 20  # far more than any bound, little enough that the old code finishes reading


def _endless(
    h: http.server.BaseHTTPRequestHandler, code: int, cut: list[bool], ended: threading.Event
) -> None:
    """Answer `code` with a body (chunked: no length to check it by) the client should stop
    reading long before its end; `cut` gets True when the client hung up first, False when the
    whole body went out."""
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    piece = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    try:
        for _ in range(_ENDLESS >> 20):
            h.wfile.write(piece)
        h.wfile.write(b"0\r\n\r\n")
        cut.append(False)
    except OSError:
        cut.append(True)
    finally:
        ended.set()
    h.close_connection = True


@pytest.mark.parametrize("where", ["manifest-404", "token", "tags"])
def test_an_answer_without_end_is_not_read_to_its_end(
    fake: FakeRegistry, repo: Repo, where: str
) -> None:
    """Only blobs and manifests were read with a bound: an error answer, a token answer or a tag
    list without end filled the memory (600 MiB of a 404 body took 1.8 GB)."""
    cut: list[bool] = []
    ended = threading.Event()  # the server's thread is done answering

    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if where == "manifest-404" and "/manifests/" in h.path:
            _endless(h, 404, cut, ended)
        elif where == "token" and h.path.startswith("/token"):
            _endless(h, 200, cut, ended)
        elif where == "token":
            realm = f'Bearer realm="http://{fake.host}/token"'
            h.send(401, headers={"WWW-Authenticate": realm})  # type: ignore[attr-defined]
        elif where == "tags" and "/tags/list" in h.path:
            _endless(h, 200, cut, ended)
        else:
            return False
        return True

    fake.hook = hook
    if where == "tags":
        with Registry(parse_remote(fake.remote()), OPTS) as reg, pytest.raises(VeloError) as ei:
            reg.tags()
        assert ei.value.reason is Reason.REMOTE_INVALID, ei.value
    else:
        want = Reason.NOT_FOUND if where == "manifest-404" else Reason.REMOTE_INVALID
        _pull_refused(repo, fake, want)
    assert ended.wait(60)  # (the server notices the hang-up on a later write)
    assert cut == [True]  # the client hung up before the end


def test_a_token_answer_with_a_content_encoding_is_refused(fake: FakeRegistry, repo: Repo) -> None:
    """Asked for none, a token service that compresses anyway could decompress into gigabytes."""

    def hook(h: http.server.BaseHTTPRequestHandler, method: str) -> bool:
        if h.path.startswith("/token"):
            h.send(200, b"\x1f\x8b not gzip", {"Content-Encoding": "gzip"})  # type: ignore[attr-defined]
        else:
            realm = f'Bearer realm="http://{fake.host}/token"'
            h.send(401, headers={"WWW-Authenticate": realm})  # type: ignore[attr-defined]
        return True

    fake.hook = hook
    err = _pull_refused(repo, fake, Reason.REMOTE_INVALID)
    assert "Content-Encoding" in err.message
