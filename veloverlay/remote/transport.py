"""What a registry connection is made of, apart from its requests: `Options`, the TLS context
(system CAs plus the per-host certs.d directories of containers and docker), origins, the
checks every answer passes (no Content-Encoding; a registry error body made readable), and where
a registry may send a request on to (`InnerGuard`).
"""

from __future__ import annotations

import glob
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpcore
import httpx

from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record
from veloverlay.remote.auth import Credentials

__all__ = [
    "env_proxied",
    "address_kinds",
    "InnerGuard",
    "PinnedBackend",
    "pin_transport",
    "pieces",
    "transport_error",
    "Options",
    "PlainFirst",
    "TooSlow",
    "paced",
    "pace_transport",
    "read_small",
    "MAX_ANSWER",
    "MAX_ERROR_BODY",
    "check_encoding",
    "is_tls_error",
    "origin",
    "registry_error",
    "send_secret",
    "show_origin",
    "ssl_context",
    "unusable",
]

# An upload body is sent in pieces at most this big: the pace is checked between two pieces (a
# send() blocked on a slow registry cannot be), so this bounds how long a piece may take: 11 min
# at 100 bytes/s.
_UPLOAD_PIECE = 64 << 10
_DEFAULT_PORT = {"http": 80, "https": 443}
# Answers that are not blobs or manifests (those have their own bounds): a tag list, a token, the
# /v2/ probe, an upload's answer. None has a reason to be big; one without end must not fill the
# memory. Of an error answer only the start is read, for its message.
MAX_ANSWER = 16 << 20
MAX_ERROR_BODY = 64 << 10


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port made explicit."""
    return url.scheme, url.host, url.port or _DEFAULT_PORT.get(url.scheme)


def show_origin(url: httpx.URL) -> str:
    scheme, host, port = origin(url)
    return f"{scheme}://{host}:{port}"


class Options(Record):
    """How to talk to a registry."""

    tls_verify: bool = True
    ca_cert: str | None = None
    credentials: Credentials | None = None  # None: look them up in the credential files
    jobs: int = 4  # parallel transfers
    retries: int = 4  # per request, after the first try
    timeout: float = 60.0
    backoff: float = 0.25  # first retry delay (s); doubles, with jitter, capped at 8 s
    # A body arriving (or, uploaded, taken) slower than this many bytes/s over `low_speed_time`
    # seconds is cut and sent again (as curl's --speed-limit/--speed-time, git's
    # http.lowSpeedLimit): the read and write timeouts start again with every byte, so a
    # registry dripping one byte a minute would hold a pull or a push forever.
    low_speed_limit: int = 1024
    low_speed_time: float = 60.0


def cause_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_tls_error(exc: BaseException) -> bool:
    return any(
        isinstance(e, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
        for e in cause_chain(exc)
    )


def ssl_context(host: str, opts: Options) -> ssl.SSLContext | bool:
    if not opts.tls_verify:
        return False
    ctx = ssl.create_default_context()  # OpenSSL's default paths: the system CAs
    extra = sorted(glob.glob(f"/etc/containers/certs.d/{host}/*.crt"))
    extra += sorted(glob.glob(f"/etc/docker/certs.d/{host}/*.crt"))
    if opts.ca_cert:
        extra.append(opts.ca_cert)
    for path in extra:
        try:
            ctx.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise VeloError(
                f"cannot load the CA certificate {path}: {exc}",
                reason=Reason.REMOTE_TLS,
                path=path,
            ) from None
    return ctx


def env_proxied(host: str) -> bool:
    """Whether the environment names a proxy for plain http (`http_proxy`, `all_proxy`, any
    case), which httpx honours (with `no_proxy`) only on a client built without a transport. A
    registry on loopback is never reached through one (as the container tools' Go clients)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.strip("[]") in ("localhost", "::1") or name.startswith("127."):
        return False
    return bool({"http", "all"} & set(urllib.request.getproxies()))


_INNER = ("loopback", "link-local", "private")


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:  # 169.254.0.0/16 (cloud metadata services), fe80::/10
        return "link-local"
    return "public" if ip.is_global else "private"  # RFC 1918, ULA, CGNAT, reserved, ...


def address_kinds(host: str) -> set[str]:
    """The kinds of address `host` (an IP literal or a name, resolved) is on: "loopback",
    "link-local", "private", "public"; none for a name that does not resolve (connecting to
    it fails the same way)."""
    name = host.strip("[]")
    try:
        return {_kind(ipaddress.ip_address(name))}
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return {"loopback"}
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return set()
    return {_kind(ipaddress.ip_address(str(i[4][0]).split("%")[0])) for i in infos}


class InnerGuard:
    """An httpx request hook: a request the registry sends on to another host (a redirect, an
    upload Location, a Link, a token realm) may reach a loopback, link-local or private address
    only if the registry itself is on one of that kind (a registry on loopback may also send on
    to private addresses: a local registry in front of a store on the network). Else a
    registry on the internet could make this machine fetch from its own network (blind SSRF:
    169.254.169.254, a service on 127.0.0.1) on its behalf. The hook refuses early, before a
    request is made, by what the name resolves to now; the connection itself is made by
    `PinnedBackend`, which resolves the name once, checks those addresses the same way and
    connects to one of them: a name that resolves to a public address for the hook and to
    loopback a moment later (DNS rebinding) is refused there."""

    def __init__(self, registry: str, host: str) -> None:
        self.registry = registry
        self.host = host
        self._kinds: dict[str, set[str]] = {}  # per host, resolved once (a pull's blobs
        self._lock = threading.Lock()  # may all go to one CDN host: one lookup, not one each)

    def kinds(self, host: str) -> set[str]:
        with self._lock:
            hit = self._kinds.get(host)
        if hit is None:
            hit = address_kinds(host)
            with self._lock:
                self._kinds[host] = hit
        return hit

    def __call__(self, request: httpx.Request) -> None:
        host = request.url.host
        if host != self.host:
            detail = f"{request.method} {request.url.copy_with(query=None)}"
            self.check(host, self.kinds(host), detail)

    def check(self, host: str, kinds: set[str], detail: str) -> None:
        """Refuse `host` on addresses of `kinds` unless the registry is as inside as that."""
        inner = kinds & set(_INNER)
        if not inner:
            return
        own = self.kinds(self.host)
        allowed = own | ({"private"} if "loopback" in own else set())
        bad = sorted(inner - allowed)
        if bad:
            raise VeloError(
                f"{self.registry} sent a request on to {host}, a {bad[0]} address, while it "
                "is not on one itself: refused",
                reason=Reason.REMOTE_REDIRECT,
                hint="a registry may send requests on only to hosts as reachable as itself "
                "(docs/remote.md); use a registry you trust, or one on the same network",
                detail=detail,
            )


class PinnedBackend(httpcore.NetworkBackend):
    """Connections to a host other than the registry's own: its name is resolved once, every
    address it has is checked (`InnerGuard.check`), and the connection goes to one of exactly
    those addresses (TLS still verifies the name: httpcore gives it to `start_tls`). The
    registry's own host, named by the user, is connected to as given."""

    def __init__(self, inner: httpcore.NetworkBackend, guard: InnerGuard) -> None:
        self.inner, self.guard = inner, guard

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if host == self.guard.host:
            return self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"{host}: {exc}") from exc
        addrs = list(dict.fromkeys(str(i[4][0]) for i in infos))
        kinds = {_kind(ipaddress.ip_address(a.split("%")[0])) for a in addrs}
        self.guard.check(host, kinds, f"connect {host}:{port} ({', '.join(addrs)})")
        last: Exception = httpcore.ConnectError(f"{host}: no address")
        for addr in addrs:
            try:
                return self.inner.connect_tcp(addr, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def pin_transport(transport: httpx.BaseTransport, guard: InnerGuard) -> httpx.BaseTransport:
    """`transport` connecting through `PinnedBackend`, when it is one of httpx's own (not a
    proxy's: a proxy resolves the names it is given, and is reached as configured)."""
    if isinstance(transport, PlainFirst):
        pin_transport(transport.plain, guard)
        make_tls = transport._make_tls
        transport._make_tls = lambda: pin_transport(make_tls(), guard)
        return transport
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore.NetworkBackend) and not isinstance(backend, PinnedBackend):
        pool._network_backend = PinnedBackend(backend, guard)  # type: ignore[union-attr]
    return transport


class PlainFirst(httpx.BaseTransport):
    """The transport of a plain-http registry: http URLs go through a connection pool that
    never speaks TLS (so no CA bundle is loaded for it: ~15-35 ms per command), https URLs (a
    storage front end a redirect names) through a verifying one built on first use by
    `make_tls` (the same as httpx's default)."""

    def __init__(self, limits: httpx.Limits, make_tls: Callable[[], httpx.BaseTransport]) -> None:
        self.plain = httpx.HTTPTransport(limits=limits, verify=False)  # never used for TLS
        self._make_tls = make_tls
        self._tls: httpx.BaseTransport | None = None
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme == "http":
            return self.plain.handle_request(request)
        with self._lock:
            if self._tls is None:
                self._tls = self._make_tls()
            tls = self._tls
        return tls.handle_request(request)

    def close(self) -> None:
        self.plain.close()
        with self._lock:
            if self._tls is not None:
                self._tls.close()


def unusable(host: str, exc: Exception) -> VeloError:
    return VeloError(
        f"the answer of {host} is unusable: {exc or type(exc).__name__}",
        reason=Reason.REMOTE_INVALID,
    )


def send_secret(client: httpx.Client, req: httpx.Request, hops: int = 5) -> httpx.Response:
    """Send `req`, whose body holds a secret (an identity token), following redirects on its
    own origin only. httpx keeps a 307/308's body for the next hop whatever its origin (it
    strips only the Authorization header), so the secret would go wherever a token service
    pointed, plain http included."""
    resp = client.send(req, stream=True, follow_redirects=False)
    while resp.next_request is not None:
        nxt = resp.next_request
        resp.close()
        if origin(nxt.url) != origin(req.url):
            raise VeloError(
                f"the token service {show_origin(req.url)} sent the identity token on to "
                f"{show_origin(nxt.url)}: not sent there",
                reason=Reason.REMOTE_AUTH,
                hint="a token service redirects within its own origin only",
            )
        hops -= 1
        if hops < 0:
            raise httpx.TooManyRedirects("the token service redirects too often", request=nxt)
        resp = client.send(nxt, stream=True, follow_redirects=False)
    return resp


def check_encoding(host: str, resp: httpx.Response) -> None:
    enc = resp.headers.get("content-encoding", "").strip().lower()
    if enc not in ("", "identity"):
        resp.close()
        raise VeloError(
            f"{host} sent a body with Content-Encoding '{enc}' after being asked for none",
            reason=Reason.REMOTE_INVALID,
        )


_LINE_BREAK = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def registry_error(resp: httpx.Response) -> str:
    """The first error a registry's answer names, as one line: its line breaks are shown
    escaped (the CLI escapes the other control characters), so the registry's text cannot
    add a line that reads like the CLI's own `hint:` or `reason:`."""
    try:
        errs = resp.json().get("errors") or []
        first = errs[0]
        text = f"{first.get('code', '?')}: {first.get('message', '')}"
    except Exception:
        text = resp.reason_phrase or ""
    return _LINE_BREAK.sub(lambda m: repr(m.group())[1:-1], text)


class TooSlow(httpx.ReadTimeout):
    """A body that arrived below `Options.low_speed_limit` (a transport error: retried)."""

    upload = False


class TooSlowUpload(TooSlow):
    """A request body the registry took below `Options.low_speed_limit`."""

    upload = True


def paced(chunks: Iterable[bytes], opts: Options, *, upload: bool = False) -> Iterator[bytes]:
    """`chunks` as they come, as long as at least `low_speed_limit` bytes/s arrive over every
    `low_speed_time` seconds (checked as each chunk arrives; silence is the read timeout's).
    With `upload`, `chunks` is a request body: the client asks for the next chunk once the
    previous one is sent, so the same check, counting what was sent, bounds how slowly the
    registry may take it (checked between chunks: keep them small)."""
    start, got = time.monotonic(), 0
    for chunk in chunks:
        if not upload:
            got += len(chunk)
        now = time.monotonic()
        if now - start >= opts.low_speed_time:
            if got < opts.low_speed_limit * (now - start):
                raise (TooSlowUpload if upload else TooSlow)(
                    f"less than {opts.low_speed_limit} bytes/s "
                    f"{'were sent' if upload else 'arrived'} for {now - start:.0f} s ({got} bytes)"
                )
            start, got = now, 0
        yield chunk
        if upload:  # sent by now
            got += len(chunk)


_SLOW_ANSWER = "the answer arrives below the low-speed limit"


class _PacedStream(httpcore.NetworkStream):
    """A connection whose every answer, its status line and headers too, must arrive at
    `low_speed_limit` bytes/s over each `low_speed_time` seconds (checked at each read, as
    `paced` checks a body). The read timeout starts again with every byte: a registry dripping
    the head of its answer a byte at a time held a request for days (h11 takes 16 KiB of it)."""

    def __init__(self, inner: httpcore.NetworkStream, opts: Options) -> None:
        self.inner, self.opts = inner, opts
        self.since: float | None = None  # when the current window began (None: none yet)
        self.got = 0

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.since = None  # a request (or more of one): its answer starts a new window
        self.inner.write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        now = time.monotonic()
        if self.since is None:
            self.since, self.got = now, 0
        elif now - self.since >= self.opts.low_speed_time:
            if self.got < self.opts.low_speed_limit * (now - self.since):
                raise httpcore.ReadTimeout(
                    f"{_SLOW_ANSWER} ({self.got} bytes in {now - self.since:.0f} s)"
                )
            self.since, self.got = now, 0
        data = self.inner.read(max_bytes, timeout)
        self.got += len(data)
        return data

    def close(self) -> None:
        self.inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _PacedStream(self.inner.start_tls(ssl_context, server_hostname, timeout), self.opts)

    def get_extra_info(self, info: str) -> object:
        return self.inner.get_extra_info(info)


class _PacedBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend, opts: Options) -> None:
        self.inner, self.opts = inner, opts

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _PacedStream(stream, self.opts)

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


def pace_transport(transport: httpx.BaseTransport, opts: Options) -> httpx.BaseTransport:
    """`transport` with the low-speed limit on every answer (`_PacedStream`), when it is one of
    httpx's own (its httpcore pool takes the network backend it makes connections with)."""
    if isinstance(transport, PlainFirst):
        pace_transport(transport.plain, opts)
        make_tls = transport._make_tls
        transport._make_tls = lambda: pace_transport(make_tls(), opts)
        return transport
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, httpcore.NetworkBackend) and not isinstance(backend, _PacedBackend):
        pool._network_backend = _PacedBackend(backend, opts)  # type: ignore[union-attr]
    return transport


def read_small(
    resp: httpx.Response, opts: Options, host: str, *, limit: int = MAX_ANSWER, cut: bool = False
) -> httpx.Response:
    """`resp` (sent with `stream=True`) with its body read and the connection closed: at most
    `limit` bytes, paced as a blob is (`paced`). Over `limit` is REMOTE_INVALID, or with `cut`
    (an error answer, read for its message only) the body is cut there."""
    buf = bytearray()
    try:
        for chunk in paced(resp.iter_bytes(), opts):
            buf += chunk
            if len(buf) > limit:
                if cut:
                    del buf[limit:]
                    break
                raise VeloError(
                    f"{host} answered {resp.request.method} {resp.request.url.path} with more "
                    f"than {limit} bytes",
                    reason=Reason.REMOTE_INVALID,
                )
    finally:
        resp.close()
    return httpx.Response(
        resp.status_code, headers=resp.headers, content=bytes(buf), request=resp.request
    )


def transport_error(host: str, base_url: str, exc: httpx.TransportError, url: str) -> VeloError:
    """The error a transfer that failed on the way (TLS, connection, too slow) is."""
    if is_tls_error(exc):
        plain = "WRONG_VERSION_NUMBER" in str(exc)  # the answer to a TLS hello was not TLS
        return VeloError(
            f"TLS with {host} failed: {exc}",
            reason=Reason.REMOTE_TLS,
            hint=f"the registry answers without TLS: name it http://{host}/…"
            if plain
            else "pass the registry's CA with --ca-cert FILE (or put it in "
            f"/etc/containers/certs.d/{host}/ca.crt); --tls-verify=false "
            "turns verification off",
        )
    if isinstance(exc, TooSlow) or str(exc).startswith(_SLOW_ANSWER):
        return VeloError(
            f"{host} {'takes uploads' if getattr(exc, 'upload', False) else 'sends'} too "
            f"slowly: {exc}",
            reason=Reason.REMOTE_UNREACHABLE,
            hint="check the network and the registry, then retry (what arrived whole is kept)",
            detail=url,
        )
    return VeloError(
        f"cannot reach {base_url}: {exc or type(exc).__name__}",
        reason=Reason.REMOTE_UNREACHABLE,
        hint="check the host, the port and the scheme (http:// for a registry without TLS)",
        detail=url,
    )


def pieces(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes]:
    """`chunks` cut into pieces of at most `_UPLOAD_PIECE` bytes."""
    for chunk in chunks:
        if len(chunk) <= _UPLOAD_PIECE:
            yield bytes(chunk)
            continue
        view = memoryview(chunk)
        for i in range(0, len(view), _UPLOAD_PIECE):
            yield bytes(view[i : i + _UPLOAD_PIECE])
