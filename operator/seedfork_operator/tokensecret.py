"""The token Secret's lifecycle: what the operator does when it finds the Secret gone, changed or as it was. Pure.

Pods read the token from the Secret once, at start (an env var), so a Secret that changes under running pods
must not lock them out of each other:

- Deleted: the operator made it, so it makes it again with the token it last read, which every pod holds
  (a new token only if it never read one, e.g. deleted while the operator was down; then the pods created
  before answer 401 to the new ones, which fall back to storage). A Secret named by the spec is the
  user's: it is reported missing, never made up.
- Rotated (``token`` changed): the token the operator last read goes under ``previous``. Agents accept both
  and clients present ``previous`` when a seed answers 401 to ``token``, so pods from before and after the
  rotation keep pulling from each other. Once no pod started with the old token is left, ``previous`` is
  removed and only the new token opens the weights: the grace period ends by itself.
- A restarted operator reads the Secret as it is and reuses it; it never makes a new token for a set whose
  Secret exists.

Pods carry the digest of the token they started with (``contract.ANN_TOKEN_DIGEST``), never the token.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from seedfork_api.contract import TOKEN_PREVIOUS_KEY, TOKEN_SECRET_KEY

from .problem import Problem


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def decoded(data: Mapping[str, str] | None) -> dict[str, str]:
    out = {}
    for key, value in (data or {}).items():
        try:
            out[key] = base64.b64decode(value).decode()
        except (ValueError, UnicodeDecodeError):
            out[key] = ""
    return out


@dataclass(frozen=True)
class Step:
    """What to do about the Secret this pass. ``data`` is the whole new content when something is written."""

    token: str | None = None  # the token pods created now get; None: no usable token
    create: dict[str, str] | None = None
    patch: dict[str, str | None] | None = None  # keys to set (None deletes the key)
    event: tuple[str, str] | None = None  # (reason, message) of a Warning/Normal event worth posting
    problem: Problem | None = None  # Degraded


def decide(
    *,
    secret: str,
    namespace: str,
    named: bool,
    found: Mapping[str, str] | None,  # decoded data, or None when the Secret does not exist
    last_token: str | None,  # the token this operator last read from it
    pod_digests: Iterable[str],  # token digests of the set's live pods
    new_token: str,
) -> Step:
    if found is None:
        if named:
            return Step(
                problem=Problem(
                    "TokenSecretMissing",
                    f"Secret {secret} named by spec.transfer.tokenSecretName does not exist in namespace {namespace}",
                )
            )
        token = last_token or new_token
        why = (
            "with the token the pods hold"
            if last_token
            else "with a new token (pods started before answer 401 to new pods until they are replaced)"
        )
        event = ("TokenSecretRecreated", f"Secret {secret} was missing; created it {why}")
        worth_saying = last_token or any(pod_digests)  # a first Secret for a new set is no news
        return Step(token=token, create={TOKEN_SECRET_KEY: token}, event=event if worth_saying else None)
    token = found.get(TOKEN_SECRET_KEY)
    if not token:
        return Step(problem=Problem("TokenSecretInvalid", f"Secret {secret} has no key '{TOKEN_SECRET_KEY}'"))
    previous = found.get(TOKEN_PREVIOUS_KEY)
    held = {d for d in pod_digests if d}
    known = {token_digest(t) for t in (token, previous, last_token) if t}
    if held - known:
        return Step(
            token=token,
            problem=Problem(
                "TokenUnknownToPods",
                f"{len(held - known)} token(s) held by running pods are no longer in Secret {secret} (rotated while "
                f"the operator was away?): those pods answer 401 to newer ones; put the old token under "
                f"'{TOKEN_PREVIOUS_KEY}' or replace them",
            ),
        )
    if last_token and last_token != token and last_token != previous:
        event = (
            "TokenRotated",
            f"Secret {secret} has a new token; the old one stays accepted as '{TOKEN_PREVIOUS_KEY}' "
            "while pods started with it run",
        )
        return Step(token=token, patch={TOKEN_PREVIOUS_KEY: last_token}, event=event)
    if previous and token_digest(previous) not in held:
        event = ("TokenGraceEnded", f"no pod holds the previous token of Secret {secret} any more; it is removed")
        return Step(token=token, patch={TOKEN_PREVIOUS_KEY: None}, event=event)
    return Step(token=token)
