"""The agent's HTTP API (aiohttp), bound to the pod IP.

Open: ``/healthz``, ``/readyz``, ``/v1/progress``, ``/metrics`` (no weight data).
Bearer token: ``/v1/manifest``, ``/v1/attach``, ``/v1/transfers`` and SGLang's
R-Fork endpoints, spoken with SGLang's paths, bodies and responses for seedfork's
own clients. Stock SGLang clients are refused (no token, and SGLang's parameter
layout differs from the checkpoint's): docs/sglang.md, "Stock SGLang".
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import groups, refusal
from .store import WeightStore
from .te import TransferEngineError, TransferEngineHandle

log = logging.getLogger("seedfork.agent.server")


@dataclass
class Progress:
    """What this agent is doing now; read by /readyz, /v1/progress and the pod report."""

    state: str = "pending"  # pending | transferring | verified | failed
    attempt: int = 0
    source: str | None = None
    backend: str | None = None
    seed: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class _SendGroup:
    """One R-Fork send group: one client (world 2) or a cohort of clients (world k+1)."""

    name: str
    world_size: int
    ready: asyncio.Future
    sent: asyncio.Future | None = None
    pg: Any = None
    created: float = field(default_factory=time.monotonic)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.bytes_served = Counter(
            "seedfork_agent_bytes_served", "Bytes this agent served to clients", ["backend"], registry=r
        )
        self.transfers = Counter(
            "seedfork_agent_transfers", "Transfers served or pulled", ["role", "backend", "result"], registry=r
        )
        self.duration = Histogram(
            "seedfork_agent_transfer_seconds",
            "Duration of transfers",
            ["role", "backend"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.active_clients = Gauge("seedfork_agent_active_clients", "Transfers served now", registry=r)
        self.bytes_done = Gauge("seedfork_agent_pull_bytes_done", "Bytes pulled in this attempt", registry=r)
        self.bytes_total = Gauge("seedfork_agent_pull_bytes_total", "Bytes to pull in this attempt", registry=r)
        self.serving = Gauge("seedfork_agent_serving", "1 when weights are verified and served", registry=r)
        self.checksum_seconds = Histogram(
            "seedfork_agent_checksum_seconds", "Time to checksum the whole store", registry=r
        )


class AgentServer:
    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        *,
        timeout_s: float = 300.0,
        bandwidth_limit_mbps: int | None = None,
        te_factory: Any = None,
    ) -> None:
        if host in ("0.0.0.0", "::", ""):
            raise ValueError("the agent binds to the pod IP, never to all interfaces")
        if not token:
            raise ValueError("a bearer token is required")
        self.host = host
        self.port = port
        self._token = token.encode()
        self.timeout_s = timeout_s
        self.bandwidth_limit_bps = bandwidth_limit_mbps * 1e6 if bandwidth_limit_mbps else None
        self.store: WeightStore | None = None
        self.te: TransferEngineHandle | None = None
        self._te_factory = te_factory  # called once to create/register TE when a store starts serving
        self.progress = Progress()
        self.metrics = Metrics()
        self.active_clients = 0
        self._groups: dict[str, _SendGroup] = {}
        self._te_clients: dict[str, float] = {}
        self._te_info_body = b""
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self.on_change: Any = None  # called (no args) when activeClients changes

    # ---- lifecycle --------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/v1/progress", self.progress_view)
        app.router.add_get("/metrics", self.metrics_view)
        app.router.add_get("/v1/manifest", self.manifest_view)
        app.router.add_get("/v1/attach", self.attach_view)
        app.router.add_post("/v1/transfers", self.transfer_event)
        app.router.add_post("/init_weights_send_group_for_remote_instance", self.init_send_group)
        app.router.add_post("/send_weights_to_remote_instance", self.send_weights)
        app.router.add_get("/remote_instance_transfer_engine_info", self.te_info)
        app.router.add_get("/get_remote_instance_transfer_engine_info", self.te_info_deprecated)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        log.info("agent API on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        for g in list(self._groups.values()):
            groups.destroy_group(g.pg)
        self._groups.clear()
        if self._runner:
            await self._runner.cleanup()

    def serve(self, store: WeightStore) -> None:
        """Start serving a verified store (register it with TransferEngine once, if enabled)."""
        if store.device.type == "cuda":
            torch.cuda.set_device(store.device)  # this may run in a worker thread: make its CUDA context current
        if self._te_factory is not None:
            try:
                self.te = self._te_factory()
                self.te.register(store.buffer.data_ptr(), store.nbytes)
            except TransferEngineError as e:  # NCCL/gloo still work without it
                log.warning("not serving over TransferEngine: %s", e)
                self.te = None
        if self.te is not None:
            # The pointers stay valid while this store is served: every client gets the same answer, built once.
            weights = {t.name: [store.data_ptr(t.name), t.numel, t.element_size] for t in store.manifest.tensors}
            body = {"rank": 0, "remote_instance_transfer_engine_info": [self.te.session_id, weights]}
            self._te_info_body = json.dumps(body).encode()
        self.store = store
        self.metrics.serving.set(1)

    @property
    def serving(self) -> bool:
        return self.store is not None and self.progress.state == "verified"

    # ---- helpers ----------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as e:  # a bad request gets a 4xx/5xx answer, never a crashed agent
            log.exception("handler %s failed", request.path)
            return web.json_response({"error": {"message": f"{type(e).__name__}: {e}"}}, status=500)

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self._token)

    def _require_token(self, request: web.Request) -> None:
        if not self._authorized(request):
            raise web.HTTPUnauthorized(
                text='{"error": {"message": "missing or wrong bearer token"}}',
                content_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_active(self, delta: int) -> None:
        self.active_clients += delta
        self.metrics.active_clients.set(self.active_clients)
        if self.on_change:
            self.on_change()

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except Exception:
            raise web.HTTPBadRequest(text="body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    # ---- open endpoints ---------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.serving:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "state": self.progress.state}, status=503)

    async def progress_view(self, request: web.Request) -> web.Response:
        p = self.progress
        return web.json_response(
            {
                "state": p.state,
                "attempt": p.attempt,
                "source": p.source,
                "backend": p.backend,
                "seed": p.seed,
                "bytesDone": p.bytes_done,
                "bytesTotal": p.bytes_total,
                "error": p.error,
                "serving": self.serving,
                "activeClients": self.active_clients,
            }
        )

    async def metrics_view(self, request: web.Request) -> web.Response:
        p = self.progress
        self.metrics.bytes_done.set(p.bytes_done)
        self.metrics.bytes_total.set(p.bytes_total)
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- weight endpoints (token) -----------------------------------------
    async def manifest_view(self, request: web.Request) -> web.Response:
        self._require_token(request)
        if not self.serving:
            return web.json_response({"error": {"message": "weights not verified yet"}}, status=503)
        return web.Response(body=self.store.manifest.json_bytes, content_type="application/json")

    async def attach_view(self, request: web.Request) -> web.Response:
        self._require_token(request)
        if not self.serving:
            return web.json_response({"error": {"message": "weights not verified yet"}}, status=503)
        return web.json_response({"attach": self.store.attach_info(), "manifest": self.store.manifest.to_dict()})

    async def transfer_event(self, request: web.Request) -> web.Response:
        """Our clients announce one-sided (TE) reads, which the seed cannot see, for metrics and load."""
        self._require_token(request)
        body = await self._json(request)
        client, event = str(body.get("client", "")), body.get("event")
        if event == "start" and client not in self._te_clients:
            self._te_clients[client] = time.monotonic()
            self._set_active(+1)
        elif event in ("done", "failed") and client in self._te_clients:
            started = self._te_clients.pop(client)
            self._set_active(-1)
            result = "ok" if event == "done" else "failed"
            self.metrics.transfers.labels("seed", "transfer_engine", result).inc()
            self.metrics.duration.labels("seed", "transfer_engine").observe(time.monotonic() - started)
            if event == "done":
                self.metrics.bytes_served.labels("transfer_engine").inc(int(body.get("bytes", 0)))
        else:
            raise web.HTTPBadRequest(text="event must be start, done or failed")
        return web.json_response({"ok": True})

    # ---- SGLang R-Fork, NCCL backend (docs/sglang.md) ----------------------
    async def init_send_group(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            # A stock SGLang client sends no token and never reads this answer: end its rendezvous too.
            try:
                body = await request.json()
            except Exception:
                body = None
            refused = refusal.refuse_stock_client(self.host, body)
            message = "missing or wrong bearer token: seedfork seeds serve only seedfork agents (docs/sglang.md)"
            if refused:
                message += f"; the rendezvous on ports {refused} is closed so that the client fails at once"
            raise web.HTTPUnauthorized(
                text=json.dumps({"success": False, "message": message}),
                content_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:
            body = await self._json(request)
            master = str(body["master_address"])
            ports = [int(p) for p in str(body["ports"]).split(",")]
            world_size = int(body["world_size"])
            base = str(body.get("group_name", "weight_send_group"))
            requested = str(body.get("backend", "nccl"))
        except (KeyError, ValueError) as e:
            return _rfork_fail(f"bad request: {e!r}")
        if not self.serving:
            return _rfork_fail("this instance is not serving weights")
        if len(ports) != 1:
            # SGLang asserts one port per TP rank; this agent holds one rank.
            return _rfork_fail(f"expected 1 port (tp_size 1), got {len(ports)}")
        if world_size < 2:
            return _rfork_fail("world_size must be at least 2")
        name = groups.group_name(base, ports[0], 0)
        group = self._groups.get(name)
        if group is None:
            loop = asyncio.get_running_loop()
            group = _SendGroup(name, world_size, loop.create_future())
            self._groups[name] = group
            backend = groups.local_backend(requested, self.store.device)
            self._spawn(self._build_group(group, backend, master, ports[0]))
        elif group.world_size != world_size:
            return _rfork_fail(f"group {name} exists with world_size {group.world_size}")
        try:
            await asyncio.wait_for(asyncio.shield(group.ready), self.timeout_s + 5)
        except Exception as e:
            return _rfork_fail(f"failed to build group {name}: {e}")
        return web.json_response({"success": True, "message": f"group {name} ready"})

    async def _build_group(self, group: _SendGroup, backend: str, master: str, port: int) -> None:
        try:
            group.pg = await asyncio.to_thread(
                groups.init_group, backend, master, port, group.world_size, 0, group.name, self.timeout_s,
                self.store.device,
            )  # fmt: skip
            group.ready.set_result(True)
            # A client that never asks for the weights must not pin the group (and its port) forever.
            asyncio.get_running_loop().call_later(self.timeout_s, self._expire, group)
        except Exception as e:
            self._groups.pop(group.name, None)
            group.ready.set_exception(RuntimeError(str(e)))
            group.ready.exception()  # mark retrieved

    def _expire(self, group: _SendGroup) -> None:
        if group.sent is None and self._groups.get(group.name) is group:
            log.warning("group %s expired without a send request", group.name)
            self._groups.pop(group.name, None)
            groups.destroy_group(group.pg)

    async def send_weights(self, request: web.Request) -> web.Response:
        self._require_token(request)
        try:
            body = await self._json(request)
            ports = [int(p) for p in str(body["ports"]).split(",")]
            base = str(body.get("group_name", "weight_send_group"))
        except (KeyError, ValueError) as e:
            return _rfork_fail(f"bad request: {e!r}")
        name = groups.group_name(base, ports[0], 0)
        group = self._groups.get(name)
        if group is None or not group.ready.done() or group.ready.exception():
            return _rfork_fail(f"no send group {name}; call /init_weights_send_group_for_remote_instance first")
        if group.sent is None:  # first client of the group starts the one broadcast all of them receive
            group.sent = asyncio.get_running_loop().create_future()
            self._spawn(self._broadcast(group))
        try:
            moved = await asyncio.shield(group.sent)
        except Exception as e:
            return _rfork_fail(f"sending weights failed: {e}")
        return web.json_response({"success": True, "message": f"sent {moved} bytes to group {name}"})

    async def _broadcast(self, group: _SendGroup) -> None:
        store = self.store
        backend = "nccl" if store.device.type == "cuda" else "gloo"
        clients = group.world_size - 1
        self._set_active(+clients)
        started = time.monotonic()
        tensors = [store.tensor(t.name) for t in store.manifest.tensors]
        counter = self.metrics.bytes_served.labels(backend)
        try:
            moved = await asyncio.to_thread(
                groups.broadcast_tensors, group.pg, tensors, lambda n: counter.inc(n * clients),
                self.bandwidth_limit_bps,
            )  # fmt: skip
            group.sent.set_result(moved)
            self.metrics.transfers.labels("seed", backend, "ok").inc(clients)
        except Exception as e:
            log.warning("broadcast to %s failed: %s", group.name, e)
            group.sent.set_exception(RuntimeError(str(e)))
            group.sent.exception()
            self.metrics.transfers.labels("seed", backend, "failed").inc(clients)
        finally:
            self.metrics.duration.labels("seed", backend).observe(time.monotonic() - started)
            self._groups.pop(group.name, None)
            # SGLang's seed destroys the group even when sending failed.
            await asyncio.to_thread(groups.destroy_group, group.pg)
            self._set_active(-clients)

    # ---- SGLang R-Fork, TransferEngine backend (docs/sglang.md) ------------
    async def te_info(self, request: web.Request) -> web.Response:
        self._require_token(request)
        try:
            rank = int(request.query["rank"])
        except (KeyError, ValueError):
            return web.json_response({"error": {"message": "Missing or invalid rank parameter"}}, status=400)
        if rank != 0 or not self.serving or self.te is None:
            return web.json_response(
                {"error": {"message": f"Failed to get transfer engine info for rank {rank}"}}, status=400
            )
        return web.Response(body=self._te_info_body, content_type="application/json")

    async def te_info_deprecated(self, request: web.Request) -> web.Response:
        log.warning(
            "/get_remote_instance_transfer_engine_info is deprecated; use /remote_instance_transfer_engine_info"
        )
        return await self.te_info(request)


def _rfork_fail(message: str) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=400)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
