"""The agent's view of its pod's engine, over the engine's own authenticated info route (``GET /v1/engine``).

Used where the engine publishes its phases (the reference engine): a standby is warm once the engine answers,
and a pod's timing gains the engine's own start, API-up and in-engine verification times. For vLLM, which
publishes none, ``HealthProbe`` reads its ``/health`` instead. Every wait here is
bounded by the caller's deadline and ends early when ``stop`` says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from . import plainhttp

POLL_S = 0.1


class EngineProbe:
    def __init__(self, host: str, port: int, token: str) -> None:
        self.url = f"http://{host}:{port}/v1/engine"
        self.headers = {"Authorization": f"Bearer {token}"}

    async def info(self) -> dict[str, Any] | None:
        """The engine's info, or None when it does not answer (not up, gone, refusing us)."""
        try:
            async with httpx.AsyncClient(timeout=2.0, verify=plainhttp.verify(self.url)) as http:
                r = await http.get(self.url, headers=self.headers)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        try:
            body = r.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    async def wait(
        self,
        until: Callable[[dict[str, Any]], bool],
        deadline: float,
        stop: Callable[[], Any] = lambda: None,
        poll_s: float = POLL_S,
    ) -> dict[str, Any] | None:
        """The first info ``until`` accepts; None at ``deadline`` (epoch seconds) or once ``stop()`` is truthy."""
        while time.time() < deadline and not stop():
            info = await self.info()
            if info is not None and until(info):
                return info
            await asyncio.sleep(poll_s)
        return None


def phases(info: dict[str, Any] | None) -> dict[str, float]:
    """The engine's phase timestamps (epoch seconds) from its info, those that are numbers."""
    raw = (info or {}).get("phases") or {}
    return {k: float(v) for k, v in raw.items() if isinstance(v, int | float)}


class HealthProbe(EngineProbe):
    """For an engine that publishes no phases (vLLM): it is up once its ``/health`` answers 200; the phase
    ``up`` is when this probe first saw that."""

    def __init__(self, host: str, port: int) -> None:
        self.url, self.headers = f"http://{host}:{port}/health", {}
        self._up: float | None = None

    async def info(self) -> dict[str, Any] | None:
        try:
            async with httpx.AsyncClient(timeout=2.0, verify=plainhttp.verify(self.url)) as http:
                r = await http.get(self.url)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        self._up = self._up or time.time()
        return {"phases": {"up": self._up}}
