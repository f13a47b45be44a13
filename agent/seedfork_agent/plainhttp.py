"""HTTP inside a set: every address the agent, its engine and its seeds serve on speaks plain HTTP, never TLS.

httpx builds a client's TLS context when the client is made, loading the CA bundle: 30-60 ms of CPU on a
small core, spent on the event loop (or thread) that makes it. A promotion's critical path makes several
clients (the engine's probe, its attach, the agent's report), so a client for a plain ``http://`` URL skips
it: it never negotiates TLS, so it never needs one. Any other URL keeps httpx's verification.
"""

from __future__ import annotations


def verify(url: str) -> bool:
    """httpx's ``verify`` for a client of ``url``: False only for plain HTTP, where no TLS is negotiated."""
    return not url.startswith("http://")
