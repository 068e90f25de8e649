"""Registry credentials where the container tools keep them, and the registry auth challenges.

Files, first match wins (as podman/skopeo read them, then Docker's):
`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
`$XDG_CONFIG_HOME/containers/auth.json` (default `~/.config`), `$DOCKER_CONFIG/config.json`
(default `~/.docker`). In each, `auths` is keyed by registry (`host[:port]`, optionally with a
repository path: the longest match wins, or a URL such as `https://index.docker.io/v1/`) and holds
`auth` (base64 of `user:password`) or `username`/`password`, or an `identitytoken`; `credHelpers`
(per registry) and `credsStore` name a `docker-credential-NAME` program on PATH (a NAME with `/`,
which would run a path from the cwd, is refused) asked with `get` (Docker
Hub: under `https://index.docker.io/v1/`, as `docker login` keeps it, then `docker.io`). Docker
Hub's other names (`index.docker.io`, `registry-1.docker.io`) are keys for `docker.io`.

Secrets never appear in a repr, a log line or an error message: only the user name and the file
they came from.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess

from veloverlay import envvars
from veloverlay.errors import Reason, VeloError

__all__ = ["Credentials", "auth_files", "find_credentials", "parse_challenge"]


class Credentials:
    """A user name and secret, and where they came from (for error messages)."""

    __slots__ = ("username", "secret", "source", "identity_token")

    def __init__(
        self, username: str, secret: str, source: str, *, identity_token: bool = False
    ) -> None:
        self.username = username
        self.secret = secret
        self.source = source
        self.identity_token = identity_token

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, source={self.source!r}, secret=***)"

    def basic(self) -> str:
        raw = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def auth_files() -> list[str]:
    home = envvars.home()
    out: list[str] = []
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        out.append(env)
    run = os.environ.get("XDG_RUNTIME_DIR")
    out.append(
        os.path.join(run, "containers/auth.json")
        if run and os.path.isabs(run)
        else f"/run/containers/{os.getuid()}/auth.json"
    )
    # Never a file found relative to the cwd: without a home, only the variables that name one.
    conf = envvars.xdg_dir("XDG_CONFIG_HOME", ".config")
    if conf:
        out.append(os.path.join(conf, "containers/auth.json"))
    docker = os.environ.get("DOCKER_CONFIG") or (os.path.join(home, ".docker") if home else "")
    if docker:
        out.append(os.path.join(docker, "config.json"))
    return out


_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")
_HUB_SERVER = "https://index.docker.io/v1/"  # Docker Hub's key in Docker's own helpers


def _normalise(key: str) -> str:
    """A credentials key as the registry (and repository path) it names: no scheme, no API
    version, and Docker Hub's other names as `docker.io`."""
    for s in ("https://", "http://"):
        if key.startswith(s):
            key = key[len(s) :]
    key = key.rstrip("/")
    for api in ("/v1", "/v2"):
        if key.endswith(api):
            key = key[: -len(api)]
    host, sep, path = key.partition("/")
    if host in _HUB_ALIASES:
        host = "docker.io"
    return host + sep + path


def _from_entry(entry: object, path: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    token = entry.get("identitytoken")
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, secret = base64.b64decode(auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise VeloError(
                f"the credentials in {path} are not base64 of user:password",
                reason=Reason.REMOTE_AUTH,
                path=path,
            ) from None
        if sep:
            if isinstance(token, str) and token:
                return Credentials(user, token, path, identity_token=True)
            return Credentials(user, secret, path)
    name, password = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(password, str):
        return Credentials(name, password, path)
    return None


def _helper(name: str, host: str, path: str) -> Credentials | None:
    prog = f"docker-credential-{name}"
    if "/" in name or "\0" in name:  # a '/' makes it a path (from the cwd), not a program on PATH
        raise VeloError(
            f"the credential helper '{prog}' named in {path} is not a program name",
            reason=Reason.REMOTE_AUTH,
            hint="credHelpers and credsStore name a docker-credential-NAME program found on "
            "PATH; NAME holds no '/'",
        )
    try:
        proc = subprocess.run(
            [prog, "get"], input=host.encode(), capture_output=True, timeout=30, check=False
        )
    except FileNotFoundError:
        return None
    except OSError as exc:  # found but not runnable (not executable, not a program)
        raise VeloError(
            f"cannot run the credential helper {prog} (named in {path}): {exc.strerror}",
            reason=Reason.REMOTE_AUTH,
        ) from None
    except subprocess.TimeoutExpired:
        raise VeloError(
            f"the credential helper {prog} (named in {path}) did not answer",
            reason=Reason.REMOTE_AUTH,
        ) from None
    if proc.returncode != 0:
        return None  # "credentials not found in native keychain"
    try:
        data = json.loads(proc.stdout)
        user, secret = str(data["Username"]), str(data["Secret"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise VeloError(
            f"the credential helper {prog} gave an unreadable answer", reason=Reason.REMOTE_AUTH
        ) from None
    if user == "<token>":
        return Credentials(user, secret, f"{prog} ({path})", identity_token=True)
    return Credentials(user, secret, f"{prog} ({path})")


def find_credentials(host: str, repo: str) -> Credentials | None:
    """The credentials for `host` (and `host/repo` keys, most specific first), or None."""
    parts = repo.split("/")
    keys = [f"{host}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + [host]
    for path in auth_files():
        try:
            with open(path, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, ValueError, RecursionError) as exc:  # (nested past the parser)
            raise VeloError(
                f"cannot read the credentials file {path}: {exc}",
                reason=Reason.REMOTE_AUTH,
                path=path,
            ) from None
        if not isinstance(data, dict):
            continue
        auths = data.get("auths")
        if isinstance(auths, dict):
            norm = {_normalise(k): v for k, v in auths.items() if isinstance(k, str)}
            for key in keys:
                creds = _from_entry(norm.get(key), path)
                if creds is not None:
                    return creds
        helpers = data.get("credHelpers")
        if isinstance(helpers, dict):
            helpers = {_normalise(k): v for k, v in helpers.items() if isinstance(k, str)}
        helper = helpers.get(host) if isinstance(helpers, dict) else None
        store = data.get("credsStore")
        # `docker login` keeps Docker Hub's under its old server URL; podman under docker.io
        servers = (_HUB_SERVER, host) if host == "docker.io" else (host,)
        for name in (helper, store):
            if isinstance(name, str) and name:
                for server in servers:
                    creds = _helper(name, server, path)
                    if creds is not None:
                        return creds
    return None


_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="…",service="…",scope="…"` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _PARAM.finditer(rest)}
    return scheme.lower(), params
