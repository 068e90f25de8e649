"""Remote names: `[http://|https://]HOST[:PORT]/REPO[/...][:TAG|@sha256:HEX]`.

As in the container tools, the first component is the registry when it contains a `.` or a `:` or
is `localhost`; otherwise the registry is Docker Hub (`docker.io`, whose API lives at
`registry-1.docker.io`, one-component repositories under `library/`). The scheme is https unless
the name says `http://` (a registry on loopback without TLS). A name that says its scheme
(`http://HOST/REPO`, `https://HOST/REPO`) names its registry first, whatever HOST looks like (a
bare host name on the local network), and must name a repository after it: it never means
Docker Hub, which would be reached over plain HTTP with Docker Hub's credentials.
"""

from __future__ import annotations

import re

from veloverlay.errors import Reason, VeloError
from veloverlay.records import Record

__all__ = ["RemoteName", "parse_remote", "tag_for_ref"]

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]{1,5})?\Z|^\[[0-9a-fA-F:]+\](?::[0-9]{1,5})?\Z")


class RemoteName(Record, frozen=True):
    scheme: str  # "https" or "http"
    host: str  # as written, with port: the key of credential files and TLS directories
    repo: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        return "registry-1.docker.io" if self.host == "docker.io" else self.host

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.api_host}"

    @property
    def registry(self) -> str:
        """The registry as written: `HOST[:PORT]`, with `http://` for one without TLS."""
        return f"http://{self.host}" if self.scheme == "http" else self.host

    @property
    def reference(self) -> str | None:
        """What names the version on the registry: the digest if given, else the tag."""
        return self.digest or self.tag

    def with_tag(self, tag: str) -> RemoteName:
        return self.replace(tag=check_tag(tag), digest=None)

    def __str__(self) -> str:
        s = f"{self.host}/{self.repo}"
        if self.scheme == "http":
            s = "http://" + s
        if self.digest:
            return f"{s}@{self.digest}"
        return f"{s}:{self.tag}" if self.tag else s


def _shown(text: str) -> str:
    """`text` as an error may show it: a `user:password@` before the host is masked (the
    container tools take no credentials in a name, but a user may paste a URL that has them)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    first, slash, tail = rest.partition("/")
    if "@" not in first:
        return text
    host = first.rsplit("@", 1)[1]
    return f"{scheme}{sep}***@{host}{slash}{tail}"


def _bad(text: str, why: str) -> VeloError:
    return VeloError(
        f"bad remote '{_shown(text)}': {why}",
        reason=Reason.BAD_NAME,
        hint="write HOST[:PORT]/REPOSITORY[:TAG], e.g. localhost:5000/team/envs:py311",
    )


def check_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise VeloError(
            f"'{tag}' cannot be a registry tag",
            reason=Reason.BAD_NAME,
            hint="tags are 1-128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
        )
    return tag


def parse_remote(text: str) -> RemoteName:
    rest = text
    scheme = "https"
    explicit = False  # `http://HOST/...`: the first component is the host, whatever it looks like
    for s in ("https://", "http://"):
        if rest.startswith(s):
            scheme, rest, explicit = s[:-3], rest[len(s) :], True
    if "/" in rest and "@" in rest.partition("/")[0]:  # (`ubuntu@sha256:…` is a name)
        raise VeloError(
            f"bad remote '{_shown(text)}': credentials do not go in a remote name",
            reason=Reason.BAD_NAME,
            hint="log in ('podman login HOST' or 'docker login HOST') or pass --authfile FILE",
        )
    digest = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not _DIGEST_RE.match(digest):
            raise _bad(text, "a digest is sha256: and 64 lowercase hex digits")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        check_tag(tag)
    host, sep, repo = rest.partition("/")
    if explicit and not sep:
        # `http://127.0.0.1:5000` names a registry and no repository: never Docker Hub's
        # `library/127.0.0.1:5000`, reached over plain HTTP with Docker Hub's credentials.
        raise _bad(text, "it names no repository after the registry")
    if not explicit and not sep and ("." in host or host == "localhost"):
        # `localhost:5000` or `registry.example.com` alone names a registry, not Docker Hub's
        # `library/localhost` tagged 5000: a push or pull meant for HOST would go to Docker Hub.
        raise _bad(text, "it names a registry but no repository after it")
    if not explicit and (not sep or not ("." in host or ":" in host or host == "localhost")):
        host, repo = "docker.io", rest
        if "/" not in repo:
            repo = "library/" + repo
    if not _HOST_RE.match(host):
        raise _bad(text, f"'{host}' is not a host name")
    if not _REPO_RE.match(repo):
        raise _bad(text, "a repository is lowercase components separated by '/'")
    return RemoteName(scheme, host, repo, tag, digest)


def tag_for_ref(ref: str) -> str:
    """The tag a ref is pushed under when the remote names none (tags are refs)."""
    return check_tag(ref)
