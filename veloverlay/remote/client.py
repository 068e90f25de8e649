"""A small OCI distribution client (httpx): the dozen requests veloverlay needs, nothing more.

`GET /v2/` (probe), `HEAD`/`GET …/blobs/<d>`, `POST …/blobs/uploads/[?mount=&from=]` then
`PUT <location>?digest=`, `GET`/`PUT …/manifests/<ref>`, `GET …/tags/list`. Auth follows the
registry's `WWW-Authenticate` challenge: `Basic` with the stored credentials, or `Bearer`
(a token from the realm, asked with the credentials if there are any — an identity token by the
OAuth2 POST that trades it — anonymously otherwise); `challenge.py` answers it.
TLS uses the system CAs, plus `/etc/containers/certs.d/HOST/*.crt`, `/etc/docker/certs.d/HOST/
*.crt` and `ca_cert`; `tls_verify=False` turns verification off. Idempotent requests are retried
with exponential backoff on connection errors, resets and 429/5xx; an upload is retried whole.
One `Registry` is shared by the transfer threads (httpx.Client is thread-safe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx

from veloverlay.errors import Reason, VeloError
from veloverlay.remote.auth import Credentials, find_credentials
from veloverlay.remote.challenge import answer_challenge, refused
from veloverlay.remote.name import RemoteName
from veloverlay.remote.transport import (
    MAX_ERROR_BODY,
    InnerGuard,
    Options,
    PlainFirst,
    check_encoding,
    env_proxied,
    is_tls_error,
    origin,
    pace_transport,
    paced,
    pieces,
    pin_transport,
    read_small,
    registry_error,
    show_origin,
    ssl_context,
    transport_error,
    unusable,
)

__all__ = ["Options", "Registry", "MANIFEST_TYPES", "OCI_MANIFEST"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_TYPES = (
    OCI_MANIFEST,
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MAX_MANIFEST = 4 << 20  # distribution refuses bigger manifest bodies
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_MAX_TAG_PAGES = 10_000
_T = TypeVar("_T")


class Registry:
    """One repository on one registry, with its auth state and counters."""

    def __init__(
        self,
        name: RemoteName,
        opts: Options | None = None,
        *,
        push: bool = False,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.name = name
        self.opts = opts or Options()
        self.actions = "pull,push" if push else "pull"
        self.scopes = [f"repository:{name.repo}:{self.actions}"]
        limits = httpx.Limits(
            max_connections=self.opts.jobs + 2, max_keepalive_connections=self.opts.jobs + 2
        )
        kw: dict[str, Any] = {}
        if transport is not None:
            kw["transport"] = transport
        elif name.scheme == "https" or env_proxied(name.host):  # (CAs loaded: ~35 ms)
            # (a transport of our own would turn httpx's *_PROXY/NO_PROXY handling off)
            kw["verify"] = ssl_context(name.host, self.opts)
        else:  # no CAs loaded unless a redirect leads to https
            kw["transport"] = PlainFirst(limits, lambda: httpx.HTTPTransport(limits=limits))
        guard = InnerGuard(name.host, httpx.URL(name.base_url).host)
        self.client = httpx.Client(
            timeout=httpx.Timeout(self.opts.timeout, connect=min(10.0, self.opts.timeout)),
            follow_redirects=True,
            limits=limits,
            # Blobs are content-addressed and checked by digest: no transfer encoding is
            # wanted, and one the server applies anyway is refused (`check_encoding`), so no
            # answer can decompress into more than it sent.
            headers={"User-Agent": "veloverlay", "Accept-Encoding": "identity"},
            event_hooks={"request": [guard]},
            **kw,
        )
        for t in (self.client._transport, *self.client._mounts.values()):  # (proxies)
            if transport is None and t is not None:
                pace_transport(t, self.opts)  # the head of an answer is paced too
        if transport is None:  # connections go to the addresses the guard checked
            pin_transport(self.client._transport, guard)
        self._lock = threading.Lock()
        self._creds: Credentials | None = self.opts.credentials
        self._creds_looked = self.opts.credentials is not None
        self._auth: str | None = None  # the Authorization header value in use
        self.auth_scheme = "none"  # what the registry asked for: none, basic, bearer
        self.requests = 0
        self.retried = 0
        self.bytes_in = 0  # bytes of small blobs read whole (get_blob)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------
    def url(self, path: str, repo: str | None = None) -> str:
        return f"{self.name.base_url}/v2/{repo or self.name.repo}/{path}"

    def also_pull(self, repo: str) -> None:
        """Ask for pull access to another repository of this registry too (mount sources)."""
        scope = f"repository:{repo}:pull"
        if scope not in self.scopes:
            self.scopes.append(scope)

    def _credentials(self) -> Credentials | None:
        if not self._creds_looked:
            self._creds = find_credentials(self.name.host, self.name.repo)
            self._creds_looked = True
        return self._creds

    def _authenticate(self, resp: httpx.Response) -> None:
        """Answer a 401 challenge: set the Authorization header for the next tries."""
        self.auth_scheme, self._auth = answer_challenge(
            self.client,
            resp,
            name=self.name,
            opts=self.opts,
            scopes=self.scopes,
            creds=self._credentials(),
        )

    def _transport_error(self, exc: httpx.TransportError, url: str) -> VeloError:
        return transport_error(self.name.host, self.name.base_url, exc, url)

    def _sleep(self, attempt: int, resp: httpx.Response | None = None) -> None:
        self.retried += 1
        delay = min(8.0, self.opts.backoff * (2**attempt)) * (0.5 + random.random())
        if resp is not None and resp.headers.get("retry-after", "").isdigit():
            delay = min(30.0, float(resp.headers["retry-after"]))
        time.sleep(delay)

    def request(
        self,
        method: str,
        url: str,
        *,
        expect: tuple[int, ...] = (200,),
        content: bytes | Callable[[], Any] | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        retries: int | None = None,
    ) -> httpx.Response:
        """Send with auth and retries; a status outside `expect` is a VeloError."""
        left = self.opts.retries if retries is None else retries
        attempt = 0
        answered_challenge = False
        while True:
            hdrs = dict(headers or {})
            with self._lock:
                auth = self._auth
            if auth is not None and self._same_origin(httpx.URL(url)):
                hdrs["Authorization"] = auth  # never to another origin a Location or Link named
            body = content() if callable(content) else content
            try:
                req = self.client.build_request(
                    method, url, content=body, headers=hdrs, params=params
                )
                resp = self.client.send(req, stream=True)
                self.requests += 1
                check_encoding(self.name.host, resp)
                if not stream and resp.status_code in expect:
                    resp = read_small(resp, self.opts, self.name.host)  # bounded, paced
            except httpx.TransportError as exc:
                if is_tls_error(exc) or attempt >= left:
                    raise self._transport_error(exc, url) from None
                self._sleep(attempt)
                attempt += 1
                continue
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # redirect loop, bad Location
                raise unusable(self.name.host, exc) from None
            if resp.status_code == 401:
                resp.close()
                if not self._same_origin(resp.url):
                    raise VeloError(
                        f"{self.name.host} sent {method} on to {show_origin(resp.url)}, "
                        "which asks for credentials: not sent there",
                        reason=Reason.REMOTE_AUTH,
                        detail=f"{method} {url.split('?')[0]}",
                    )
                if answered_challenge:
                    raise refused(self.name.host, self._credentials(), f"{method} {url}: HTTP 401")
                with self._lock:
                    if self._auth == auth:  # nobody answered this challenge meanwhile
                        self._authenticate(resp)
                answered_challenge = True
                continue
            if resp.status_code in _RETRY_STATUS and attempt < left:
                resp.close()
                self._sleep(attempt, resp)
                attempt += 1
                continue
            if resp.status_code not in expect:
                with contextlib.suppress(httpx.TransportError):  # (the status is the error)
                    resp = read_small(
                        resp, self.opts, self.name.host, limit=MAX_ERROR_BODY, cut=True
                    )
                resp.close()
                raise self._status_error(method, url, resp)
            return resp

    def _status_error(self, method: str, url: str, resp: httpx.Response) -> VeloError:
        what = f"{method} {url.split('?')[0]}: HTTP {resp.status_code} {registry_error(resp)}"
        if resp.status_code == 403:
            return VeloError(
                f"{self.name.host} denied access to {self.name.repo}",
                reason=Reason.REMOTE_DENIED,
                hint="the credentials are valid but lack the right to "
                f"{'push to' if 'push' in self.actions else 'pull from'} this repository",
                detail=what,
            )
        return VeloError(f"registry error: {what}", reason=Reason.REMOTE_ERROR, detail=what)

    def retrying(self, fn: Callable[[], _T]) -> _T:
        """Run a whole-blob transfer, again from its start after a transfer error (backoff)."""
        attempt = 0
        while True:
            try:
                return fn()
            except httpx.TransportError as exc:
                if attempt >= self.opts.retries:
                    raise self._transport_error(exc, self.name.base_url) from None
                self._sleep(attempt)
                attempt += 1
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise unusable(self.name.host, exc) from None

    # -- the API -------------------------------------------------------------------------------
    def ping(self) -> None:
        self.request("GET", f"{self.name.base_url}/v2/")

    def blob_exists(self, digest: str) -> bool:
        r = self.request("HEAD", self.url(f"blobs/{digest}"), expect=(200, 404))
        return r.status_code == 200

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount; False when the registry did not mount it."""
        r = self.request(
            "POST",
            self.url("blobs/uploads/"),
            params={"mount": digest, "from": from_repo},
            expect=(201, 202),
        )
        if r.status_code == 201:
            return True
        loc = r.headers.get("location")
        if loc:
            with contextlib.suppress(VeloError):
                self.request("DELETE", self._absolute(loc), expect=(204, 404), retries=0)
        return False

    def _same_origin(self, url: httpx.URL) -> bool:
        return origin(url) == origin(httpx.URL(self.name.base_url))

    def _absolute(self, location: str) -> str:
        """A Location or Link the registry sent, made absolute. It may name another origin (a
        storage front end); `request` sends credentials to the registry's origin only."""
        try:
            return str(httpx.URL(self.name.base_url).join(location))
        except httpx.InvalidURL as exc:
            raise VeloError(
                f"{self.name.host} sent an invalid link: {exc}", reason=Reason.REMOTE_INVALID
            ) from None

    def upload_blob(self, digest: str, size: int, content: Callable[[], Any]) -> None:
        """POST + PUT `?digest=` (monolithic); the whole upload is retried on failure. The body
        (`content()`: bytes, or an iterator of them) goes in chunks, cut when the registry
        takes it too slowly (`paced`): the write timeout starts again with every byte sent."""

        def body() -> Iterator[bytes]:
            data = content()
            chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
            return paced(pieces(chunks), self.opts, upload=True)

        attempt = 0
        while True:
            try:
                r = self.request("POST", self.url("blobs/uploads/"), expect=(202,))
                loc = r.headers.get("location")
                if not loc:
                    raise VeloError(
                        "the registry started an upload without a Location",
                        reason=Reason.REMOTE_ERROR,
                    )
                url = self._absolute(loc)
                sep = "&" if "?" in url else "?"
                r = self.request(
                    "PUT",
                    f"{url}{sep}digest={digest}",
                    expect=(201, 204),
                    content=body,
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(size),
                    },
                    retries=0,
                )
                self._same_digest(r, digest, "blob")
                return
            except VeloError as exc:
                retry = exc.reason in (Reason.REMOTE_UNREACHABLE, Reason.REMOTE_ERROR) and (
                    "HTTP 4" not in (exc.detail or "")
                )
                if not retry or attempt >= self.opts.retries:
                    raise
                self._sleep(attempt)
                attempt += 1

    @contextlib.contextmanager
    def blob_stream(self, digest: str, repo: str | None = None) -> Iterator[httpx.Response]:
        r = self.request("GET", self.url(f"blobs/{digest}", repo), stream=True)
        try:
            yield r
        finally:
            r.close()

    def body(self, resp: httpx.Response) -> Iterator[bytes]:
        """A streamed answer's body as it arrives, cut when it comes too slowly (`paced`)."""
        return paced(resp.iter_bytes(), self.opts)

    @contextlib.contextmanager
    def blob_range(self, digest: str, first: int, last: int) -> Iterator[httpx.Response]:
        """Bytes first..last (inclusive) of a blob: 206 where the registry serves ranges, or 200
        with the whole blob where it does not, or 416 where it refuses the range (ranges are
        optional in the distribution spec; the caller checks the status and reads it whole)."""
        r = self.request(
            "GET",
            self.url(f"blobs/{digest}"),
            headers={"Range": f"bytes={first}-{last}"},
            stream=True,
            expect=(200, 206, 416),
        )
        try:
            yield r
        finally:
            r.close()

    def get_blob(
        self, digest: str, size: int, *, limit: int = 256 << 20, repo: str | None = None
    ) -> bytes:
        """A whole (small) blob, checked against its sha256 and size."""
        if size > limit:
            raise VeloError(
                f"blob {digest} is {size} bytes, over the {limit} allowed here",
                reason=Reason.REMOTE_INVALID,
            )

        def fetch() -> bytes:
            with self.blob_stream(digest, repo) as r:
                buf = bytearray()
                for chunk in self.body(r):
                    buf += chunk
                    if len(buf) > size:
                        break
            return bytes(buf)

        data = self.retrying(fetch)  # a connection cut mid-body: read again from the start
        with self._lock:
            self.bytes_in += len(data)
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise VeloError(
                f"blob {digest} from {self.name.host} does not match its digest or size",
                reason=Reason.REMOTE_INVALID,
                hint="the registry served altered content; nothing was stored from it",
            )
        return data

    def put_blob(self, data: bytes) -> tuple[str, bool]:
        """Upload `data` unless the repository has it. Returns (digest, uploaded)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.blob_exists(digest):
            return digest, False
        self.upload_blob(digest, len(data), lambda: data)
        return digest, True

    def get_manifest(self, reference: str, repo: str | None = None) -> tuple[bytes, str, str]:
        """(body, digest, media type) of a manifest by tag or digest; NOT_FOUND when absent."""
        body, ctype = self.retrying(lambda: self._manifest_body(reference, repo))
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise VeloError(
                f"the manifest served for {reference} has digest {digest}",
                reason=Reason.REMOTE_INVALID,
            )
        return body, digest, ctype

    def _manifest_body(self, reference: str, repo: str | None) -> tuple[bytes, str]:
        try:
            r = self.request(
                "GET",
                self.url(f"manifests/{reference}", repo),
                headers={"Accept": ", ".join(MANIFEST_TYPES)},
                stream=True,
                expect=(200,),
            )
        except VeloError as exc:
            if "HTTP 404" in (exc.detail or ""):
                raise VeloError(
                    f"{self.name.host}/{repo or self.name.repo} has no {reference}",
                    reason=Reason.NOT_FOUND,
                    hint="list what is there with 'skopeo list-tags docker://"
                    f"{self.name.host}/{self.name.repo}'",
                ) from None
            raise
        try:
            buf = bytearray()
            for chunk in self.body(r):
                buf += chunk
                if len(buf) > MAX_MANIFEST:
                    raise VeloError(
                        f"the manifest {reference} is over {MAX_MANIFEST} bytes",
                        reason=Reason.REMOTE_INVALID,
                    )
        finally:
            r.close()
        return bytes(buf), r.headers.get("content-type", "").split(";")[0].strip()

    def put_manifest(self, reference: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        r = self.request(
            "PUT",
            self.url(f"manifests/{reference}"),
            content=body,
            headers={"Content-Type": media_type},
            expect=(201, 200),
        )
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self._same_digest(r, digest, "manifest")
        return digest

    def _same_digest(self, r: httpx.Response, digest: str, what: str) -> None:
        """A registry that says it stored other bytes than those sent under their digest is not
        believed (and not trusted further: the push stops before the tag moves, or says so)."""
        got = r.headers.get("docker-content-digest", "").strip()
        if got and got != digest:
            raise VeloError(
                f"{self.name.host} says it stored the {what} {digest} as '{got[:80]}'",
                reason=Reason.REMOTE_INVALID,
                hint="the registry alters or loses what it is sent; push elsewhere",
            )

    def tags(self) -> list[str]:
        out: list[str] = []
        pages, links = 0, set()
        url: str | None = self.url("tags/list")
        while url:
            r = self.request("GET", url, expect=(200, 404))
            if r.status_code == 404:
                return out
            try:
                data = r.json()
            except (ValueError, RecursionError):
                raise VeloError("the tag list is not JSON", reason=Reason.REMOTE_ERROR) from None
            tags = data.get("tags") if isinstance(data, dict) else None
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags or []):
                if tags is not None:
                    raise VeloError("the tag list is malformed", reason=Reason.REMOTE_ERROR)
                tags = []
            out += tags
            link = r.headers.get("link", "")
            url = None
            if link.startswith("<") and ">" in link:
                pages += 1
                if pages > _MAX_TAG_PAGES or link in links:
                    raise VeloError(
                        f"the tag list of {self.name} runs over {_MAX_TAG_PAGES} pages or "
                        "links back to a page already read",
                        reason=Reason.REMOTE_ERROR,
                    )
                links.add(link)
                url = self._absolute(link[1 : link.index(">")])
        return out


def dumps(obj: object) -> bytes:
    """Canonical JSON for what we push (stable bytes, so a re-push names the same blob)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
