"""The engine cache over HTTP: ``GET engine_cache.ROUTE``, the set's token required (``httpguard``).

Every agent's API serves the route (``server.AgentServer``). An SGLang pod's agent runs no weight API (SGLang
moves its own bytes), so it serves the route alone on its agent port (``CacheListener``): the port the set's
NetworkPolicy opens to the set's own pods, bound to the pod IP only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from . import httpguard
from .engine_cache import ROUTE, CacheSource, EngineCacheError

log = logging.getLogger("seedfork.agent.cache")

class CacheRoute:
    """The route's answer, once the token was checked: 404 where the pod keeps no cache, 503 until its engine
    finished compiling (a half-written cache is never sent), else the archive, packed by the first request."""

    def __init__(self, source: Callable[[], CacheSource | None]) -> None:
        self._source = source
        self._packing = asyncio.Lock()

    async def answer(self, request: web.Request) -> web.Response:
        if request.query:
            return web.json_response({"error": {"message": "this route takes no parameters"}}, status=400)
        source = self._source()
        if source is None:
            return web.json_response({"error": {"message": "this pod keeps no engine cache"}}, status=404)
        if not source.ready:
            return web.json_response({"error": {"message": "the engine has not finished compiling"}}, status=503)
        try:
            async with self._packing:  # packed once, by the first request; the others wait for it
                body = await asyncio.to_thread(source.archive)
        except EngineCacheError as e:
            return web.json_response({"error": {"message": str(e)}}, status=503)
        return web.Response(body=body, content_type="application/x-tar")


class CacheListener:
    """The engine-cache route alone, on ``host:port`` (the pod IP and the set's agent port)."""

    def __init__(self, host: str, port: int, token: str, token_previous: str | None, source: CacheSource) -> None:
        httpguard.check_host(host)
        self._tokens = httpguard.tokens(token, token_previous)
        self.host, self.port = host, port
        self._route = CacheRoute(lambda: source)
        self._runner: web.AppRunner | None = None

    async def _view(self, request: web.Request) -> web.Response:
        httpguard.require_token(request, self._tokens)
        try:
            return await self._route.answer(request)
        except Exception as e:  # a bad request gets an answer, never a crashed agent
            log.exception("engine cache request failed")
            return web.json_response({"error": {"message": f"{type(e).__name__}: {e}"}}, status=500)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(ROUTE, self._view)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("engine cache on http://%s:%d%s", self.host, self.port, ROUTE)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
