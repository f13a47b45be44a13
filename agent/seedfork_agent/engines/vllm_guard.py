"""vLLM's API refuses requests until the pod's agent has verified the weights inside the engine.

An ASGI middleware for vLLM's own ``--middleware`` option (the operator renders
``--middleware seedfork_agent.engines.vllm_guard.guard``). A vLLM started as a warm standby answers
``/health`` before it holds any weights: it must, so that it counts as warm. Anything it computed then
would be computed with placeholder parameters, and vLLM's prefix cache would keep the result for later
requests; so until the agent reports the attempt ``verified`` every route but the liveness and
monitoring ones answers 503. The agent's state is read from its open ``/v1/progress`` (same pod: the
pod IP and agent port of the contract), believed for ``REFRESH_S`` once verified and re-read after
``RETRY_S`` while not; an agent that does not answer counts as not verified. The readiness gate keeps
such a pod out of the Service anyway: this closes the pod IP to direct callers too.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from seedfork_agent.plainhttp import verify
from seedfork_api.contract import ENV_AGENT_PORT, ENV_POD_IP

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/load"})
REFRESH_S = 2.0  # how long "verified" is believed
RETRY_S = 0.25  # how long "not verified" is: a promoted standby serves as soon as its agent says so

_state: dict[str, Any] = {"verified": False, "checked": -REFRESH_S}


def _agent_url() -> str | None:
    ip, port = os.environ.get(ENV_POD_IP), os.environ.get(ENV_AGENT_PORT)
    return f"http://{ip}:{port}/v1/progress" if ip and port else None


async def verified() -> bool:
    """Whether the agent says this pod's engine holds verified weights."""
    now = time.monotonic()
    if now - _state["checked"] < (REFRESH_S if _state["verified"] else RETRY_S):
        return _state["verified"]
    url, ok = _agent_url(), False
    if url is not None:
        try:  # a client per read: never tied to another event loop
            async with httpx.AsyncClient(timeout=2.0, verify=verify(url)) as client:
                r = await client.get(url)
            ok = r.status_code == 200 and r.json().get("state") == "verified"
        except (httpx.HTTPError, ValueError):
            ok = False
    _state["verified"], _state["checked"] = ok, now
    return ok


async def guard(request: Any, call_next: Any) -> Any:
    """``@app.middleware("http")``: the request goes on only once the weights are verified."""
    if request.url.path in OPEN_PATHS or await verified():
        return await call_next(request)
    from fastapi.responses import JSONResponse  # vLLM's own web framework, there in its API server

    return JSONResponse(
        {"error": {"message": "this replica's weights are not verified yet", "type": "ServiceUnavailable"}},
        status_code=503,
    )
