"""What every HTTP listener of the agent keeps to: it binds the pod IP, never all interfaces, and a request
carries the set's bearer token (during a rotation's grace period the previous one opens it too: pods
started before the rotation hold only that)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from aiohttp import web


def check_host(host: str) -> None:
    if host in ("0.0.0.0", "::", ""):
        raise ValueError("the agent binds to the pod IP, never to all interfaces")


def tokens(token: str | None, token_previous: str | None) -> list[bytes]:
    """The tokens a listener accepts; raises without the set's token."""
    if not token:
        raise ValueError("a bearer token is required")
    return [t.encode() for t in (token, token_previous) if t]


def authorized(request: web.Request, accepted: Sequence[bytes]) -> bool:
    """Whether the request carries one of ``accepted`` as its bearer token (compared in constant time)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    given = value.strip().encode()
    return scheme.lower() == "bearer" and any([hmac.compare_digest(given, t) for t in accepted])


def require_token(request: web.Request, accepted: Sequence[bytes]) -> None:
    if not authorized(request, accepted):
        raise web.HTTPUnauthorized(
            text='{"error": {"message": "missing or wrong bearer token"}}',
            content_type="application/json",
            headers={"WWW-Authenticate": "Bearer"},
        )
