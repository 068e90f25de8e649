"""A registry's 401 challenge answered (its `WWW-Authenticate` header): `Basic` with the stored
credentials, or `Bearer` with a token from the token service (realm) the challenge names, asked
with the credentials if there are any (an identity token is traded by the OAuth2 POST, never
sent as a password), anonymously otherwise. Credentials go to a token service only over https,
unless the registry itself is plain http. The answer is read bounded, like any small answer.

Used by `client.Registry`, which keeps the header it returns. One of the remote modules that
may import httpx (with `client` and `transport`).
"""

from __future__ import annotations

import httpx

from veloverlay.errors import Reason, VeloError
from veloverlay.remote.auth import Credentials, parse_challenge
from veloverlay.remote.name import RemoteName
from veloverlay.remote.transport import (
    Options,
    check_encoding,
    read_small,
    send_secret,
    transport_error,
    unusable,
)

__all__ = ["answer_challenge", "refused"]


def refused(host: str, creds: Credentials | None, detail: str) -> VeloError:
    """Why the registry at `host` does not let us in: no credentials, or these refused."""
    if creds is None:
        return VeloError(
            f"{host} requires authentication and no credentials were found for it",
            reason=Reason.REMOTE_AUTH,
            hint=f"log in ('podman login {host}' or 'docker login'), or point "
            "REGISTRY_AUTH_FILE at an auth.json",
            detail=detail,
        )
    return VeloError(
        f"{host} refused the credentials of user '{creds.username}' (from {creds.source})",
        reason=Reason.REMOTE_AUTH,
        hint="check the user name and password; log in again",
        detail=detail,
    )


def answer_challenge(
    client: httpx.Client,
    resp: httpx.Response,
    *,
    name: RemoteName,
    opts: Options,
    scopes: list[str],
    creds: Credentials | None,
) -> tuple[str, str]:
    """Answer the 401 challenge `resp` carries: the scheme asked for (`basic`, `bearer`) and
    the Authorization header value for the next tries. `scopes`: the repository scopes a
    bearer token is asked for."""
    header = resp.headers.get("www-authenticate", "")
    scheme, params = parse_challenge(header)
    if scheme == "basic":
        if creds is None:
            raise refused(name.host, None, header)
        return "basic", creds.basic()
    if scheme != "bearer" or "realm" not in params:
        raise VeloError(
            f"{name.host} asks for an authentication scheme this client does not speak: '{header}'",
            reason=Reason.REMOTE_AUTH,
        )
    query: list[tuple[str, str | int | float | bool | None]] = []
    if params.get("service"):
        query.append(("service", params["service"]))
    scopes = list(scopes)
    if params.get("scope") and params["scope"] not in scopes:
        scopes.append(params["scope"])
    query += [("scope", s) for s in scopes]
    realm = _realm(name, params["realm"])
    if creds is not None and creds.identity_token:
        # An identity token (what `docker login` keeps for Azure and other OAuth2 token
        # services) is a refresh token: it is traded by the OAuth2 POST, never sent as a
        # password (distribution's token spec, "OAuth2 token").
        form = {"grant_type": "refresh_token", "refresh_token": creds.secret}
        form |= {"client_id": "veloverlay", "scope": " ".join(scopes)}
        form |= {"service": params["service"]} if params.get("service") else {}
        req = client.build_request("POST", realm, data=form)
    else:
        form = {}
        headers = {"Authorization": creds.basic()} if creds is not None else {}
        req = client.build_request("GET", realm, params=query, headers=headers)
    try:  # (a token answer is read as any small answer: bounded, no encoding)
        tr = send_secret(client, req) if form else client.send(req, stream=True)
        check_encoding(name.host, tr)
        tr = read_small(tr, opts, name.host)
    except httpx.TransportError as exc:
        raise transport_error(name.host, name.base_url, exc, params["realm"]) from None
    except httpx.HTTPError as exc:
        raise unusable(name.host, exc) from None
    if tr.status_code in (401, 403):
        raise refused(name.host, creds, f"token service: HTTP {tr.status_code}")
    if tr.status_code != 200:
        raise VeloError(
            f"the token service {params['realm']} answered HTTP {tr.status_code}",
            reason=Reason.REMOTE_AUTH,
        )
    try:
        data = tr.json()
    except (ValueError, RecursionError):
        data = None
    token = (data.get("token") or data.get("access_token")) if isinstance(data, dict) else None
    # (a header carries printable ASCII only: a token that is not is never sent, nor shown)
    if not isinstance(token, str) or not (token.isascii() and token.isprintable()):
        token = ""
    if not token or " " in token:
        raise VeloError(
            f"the token service {params['realm']} gave no usable token",
            reason=Reason.REMOTE_AUTH,
        )
    return "bearer", f"Bearer {token}"


def _realm(name: RemoteName, realm: str) -> httpx.URL:
    """The token service a bearer challenge names. It may be on another host (Docker Hub's
    is), but credentials go there only over TLS when the registry itself speaks TLS."""
    try:
        url = httpx.URL(realm)
    except httpx.InvalidURL as exc:
        raise VeloError(
            f"{name.host} names an invalid token service '{realm}': {exc}",
            reason=Reason.REMOTE_AUTH,
        ) from None
    ok = url.scheme == "https" or (url.scheme == "http" and name.scheme == "http")
    if not ok or not url.host:
        raise VeloError(
            f"{name.host} names the token service '{realm}': refused (credentials go "
            "to a token service only over https, unless the registry itself is plain http)",
            reason=Reason.REMOTE_AUTH,
        )
    return url
