"""The agent's HTTP API (aiohttp), bound to the pod IP.

Open: ``/healthz``, ``/readyz``, ``/v1/progress``, ``/metrics`` (no weight data).
Bearer token: ``/v1/manifest``, ``/v1/attach``, ``/v1/transfers``, ``/v1/selfcheck`` and SGLang's
R-Fork endpoints, spoken with SGLang's paths, bodies and responses for seedfork's
own clients. Stock SGLang clients are refused (no token, and SGLang's parameter
layout differs from the checkpoint's): docs/sglang.md, "Stock SGLang".

Nothing a client sends can hold the seed: a group that has not formed (pending) is capped per seed
(``max_pending_groups``, the set's maxClientsPerSeed; beyond it 429), lives ``PENDING_GROUP_S`` after its
latest member arrived and never beyond the timeout, and ends at once for every member when one member's
init request closes (the member died). A bad body is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from seedfork_api.contract import ERR_SELF_CHECK_FAILED

from . import engine_cache, groups, httpguard, refusal
from .attempt import AttemptState
from .engine_cache import CacheSource
from .engine_cache_http import CacheRoute
from .engines.gate import ENGINE, STANDBY, EngineGate, RankLayoutReport, RankReport
from .store import WeightStore
from .te import TransferEngineHandle

log = logging.getLogger("seedfork.agent.server")

# A pending group ends this long after its latest member's init request arrived (and never beyond the set's
# timeout): a real member joins its store as it sends the request, cohort siblings arrive seconds apart.
PENDING_GROUP_S = 15.0
_SWEEP_S = 0.5


ATTACH_WAIT_MAX_S = 30.0  # the longest an engine's /v1/attach?wait= may hold its request
ATTACH_WAIT_POLL_S = 0.02  # a held /v1/attach looks again this often besides on each change (in this process)


def _wait_seconds(request: web.Request) -> float:
    """``?wait=S`` of a request, 0 without it; a bad value is the client's error (400)."""
    raw = request.query.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text="wait must be a number of seconds") from None
    if not 0 <= wait <= ATTACH_WAIT_MAX_S:
        raise web.HTTPBadRequest(text=f"wait must be between 0 and {ATTACH_WAIT_MAX_S:g} seconds")
    return wait


@dataclass
class _SendGroup:
    """One R-Fork send group: one client (world 2) or a cohort of clients (world k+1)."""

    name: str
    world_size: int
    ready: asyncio.Future
    sent: asyncio.Future | None = None
    pg: Any = None
    created: float = field(default_factory=time.monotonic)
    last_member: float = field(default_factory=time.monotonic)
    members: int = 0  # init requests waiting for this group now
    arrived: int = 0  # init requests seen for this group
    aborted: str | None = None  # why the group creation must end (read by its store waits)

    @property
    def pending(self) -> bool:
        return not self.ready.done()


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
        self.pending_groups = Gauge(
            "seedfork_agent_pending_groups", "Send groups waiting for their members", registry=r
        )
        self.group_members_waiting = Gauge(
            "seedfork_agent_group_members_waiting", "Init requests waiting for their group to form", registry=r
        )
        self.groups_refused = Counter(
            "seedfork_agent_groups_refused", "Group creations refused or ended before forming", ["reason"], registry=r
        )
        self.bytes_done = Gauge("seedfork_agent_pull_bytes_done", "Bytes pulled in this attempt", registry=r)
        self.bytes_total = Gauge("seedfork_agent_pull_bytes_total", "Bytes to pull in this attempt", registry=r)
        self.serving = Gauge("seedfork_agent_serving", "1 when weights are verified and served", registry=r)
        self.checksum_seconds = Histogram(
            "seedfork_agent_checksum_seconds", "Time to checksum the whole store", registry=r
        )


class Holder(Protocol):
    """What the server reads of the agent that owns it (``agent.Agent``), which alone changes it. The server
    only reports its own doings to the attempt (clients served, self-checks) and (un)registers the store with
    TransferEngine while a client may read it."""

    attempt: AttemptState
    metrics: Metrics
    store: WeightStore | None  # verified and served
    offered: WeightStore | None  # offered to the pod's own engine before it proved its load (engines.gate)
    te: TransferEngineHandle | None  # set while a store is served over TransferEngine
    gate: EngineGate | None  # engines that load from the store themselves (vLLM)
    engine_cache: CacheSource | None  # the engine's compile cache, offered once the engine compiled

    @property
    def serving(self) -> bool: ...


class AgentServer:
    def __init__(
        self,
        host: str,
        port: int,
        token: str,
        agent: Holder,
        *,
        token_previous: str | None = None,
        timeout_s: float = 300.0,
        bandwidth_limit_mbps: int | None = None,
        group_ports: tuple[int, int] | None = None,
        max_pending_groups: int = 4,
    ) -> None:
        httpguard.check_host(host)
        self.host = host
        self.port = port
        self._tokens = httpguard.tokens(token, token_previous)
        self.timeout_s = timeout_s
        self.max_pending_groups = max(1, max_pending_groups)
        self.pending_group_s = min(PENDING_GROUP_S, timeout_s)
        # Group creations wait for their members in threads of their own: never in the default pool that
        # broadcasts, storage loads and pulls share, and never more than the cap of pending groups.
        self._group_pool = ThreadPoolExecutor(self.max_pending_groups, thread_name_prefix="seedfork-group")
        self._sweeper: asyncio.Task | None = None
        self.bandwidth_limit_bps = bandwidth_limit_mbps * 1e6 if bandwidth_limit_mbps else None
        self.group_ports = group_ports  # where this seed's rendezvous stores may listen (inclusive), None: anywhere
        self.agent = agent
        self.attempt, self.metrics = agent.attempt, agent.metrics  # the agent's, for the life of the server
        self._groups: dict[str, _SendGroup] = {}
        self._te_clients: dict[str, float] = {}
        self._te_info: tuple[WeightStore, bytes] | None = None  # the served store's answer, built once
        self._te_pending = 0  # pointers handed out whose client has not announced its read (stock SGLang never does)
        self._te_until = 0.0  # until then a handed-out pointer may still be read
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._engine_cache = CacheRoute(lambda: self.agent.engine_cache)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set (and replaced) on the loop whenever the agent says what /v1/attach answers may have changed.
        self._offer_moved = asyncio.Event()

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
        app.router.add_get("/v1/engine", self.engine_view)
        app.router.add_post("/v1/engine/layout", self.engine_layout)
        app.router.add_get(engine_cache.ROUTE, self.engine_cache_view)
        app.router.add_post("/v1/engine/report", self.engine_report)
        app.router.add_post("/v1/engine/failed", self.engine_failed)
        app.router.add_post("/v1/selfcheck", self.selfcheck)
        app.router.add_post("/init_weights_send_group_for_remote_instance", self.init_send_group)
        app.router.add_post("/send_weights_to_remote_instance", self.send_weights)
        app.router.add_get("/remote_instance_transfer_engine_info", self.te_info)
        app.router.add_get("/get_remote_instance_transfer_engine_info", self.te_info_deprecated)
        return app

    async def start(self) -> None:
        # handler_cancellation: a client that goes away (a member that died) cancels its handler, which is
        # how a pending group learns that one of its members is gone.
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.create_task(self._sweep_loop())
        log.info("agent API on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for g in list(self._groups.values()):
            g.aborted = g.aborted or "the seed is stopping"
            groups.destroy_group(g.pg)
            g.pg = None
        self._groups.clear()
        self._group_pool.shutdown(wait=False, cancel_futures=True)
        if self._runner:
            await self._runner.cleanup()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            try:
                self.sweep(time.monotonic())
            except Exception:  # never let the sweeper die
                log.exception("sweep failed")

    def sweep(self, now: float) -> None:
        """End pending groups past their bound, and forget TransferEngine reads announced but never ended."""
        for g in list(self._groups.values()):
            if g.pending and g.aborted is None:
                bound = min(g.last_member + self.pending_group_s, g.created + self.timeout_s)
                if now > bound:
                    self._abort(g, f"group {g.name} did not form within {self.pending_group_s:.0f}s of its latest "
                                   f"member ({g.arrived} of {g.world_size - 1} members asked)", "expired")  # fmt: skip
        # A client that announced "start" and died never says "done": its read ends within the transfer
        # timeout (Mooncake's own), so an older announcement is stale.
        for client, started in list(self._te_clients.items()):
            if now - started > self.timeout_s + 5:
                self._te_clients.pop(client, None)
                self._set_active(-1)
                self.metrics.transfers.labels("seed", "transfer_engine", "expired").inc()
        self._count_pending()

    def _abort(self, group: _SendGroup, reason: str, kind: str) -> None:
        if group.aborted is None and group.pending:
            log.warning("ending group %s: %s", group.name, reason)
            group.aborted = reason
            self.metrics.groups_refused.labels(kind).inc()

    def _count_pending(self) -> None:
        self.metrics.pending_groups.set(sum(g.pending for g in self._groups.values()))
        self.metrics.group_members_waiting.set(sum(g.members for g in self._groups.values()))

    @property
    def store(self) -> WeightStore | None:
        return self.agent.store

    @property
    def serving(self) -> bool:
        return self.agent.serving

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

    def _require_token(self, request: web.Request) -> None:
        httpguard.require_token(request, self._tokens)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_active(self, delta: int) -> None:
        self.attempt.clients(delta)
        self.metrics.active_clients.set(self.attempt.report.active_clients)

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except web.HTTPException:
            raise  # e.g. 413: a body beyond the server's limit
        except Exception:
            raise web.HTTPBadRequest(text="body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    # ---- open endpoints ---------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready: serving verified weights; or a warm standby, also through its promotion until that fails.
        A standby's pod is still not Ready (the operator's readiness gate is not True before its weights are
        verified), but its probe need not pass again after the promotion: the pod turns Ready the moment the
        gate does, not one probe period later (``periodSeconds`` is at least 1 s on a kubelet)."""
        if self.serving or self.attempt.warm_engine:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "state": self.attempt.state}, status=503)

    async def progress_view(self, request: web.Request) -> web.Response:
        return web.json_response(self.attempt.progress())

    async def metrics_view(self, request: web.Request) -> web.Response:
        p = self.attempt.report
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
        """The store the pod's engine attaches (or what it waits for). ``?wait=S`` (at most ``ATTACH_WAIT_MAX_S``):
        while there is no store to attach yet, or the pod is a warm standby, answer only once that changes or
        S seconds passed. The engine learns of its weights as soon as the agent offers them (``offer_changed``),
        without polling over HTTP: on a promotion, what it waits for is the critical path."""
        self._require_token(request)
        wait = _wait_seconds(request)
        first = self._attach_key()
        deadline = time.monotonic() + wait
        # The answer is made of state that threads change (the store, the offer, the gate's phase, the
        # attempt). The agent announces its changes; a look every ATTACH_WAIT_POLL_S besides catches any other.
        while first[0] != "store" and self._attach_key() == first and (left := deadline - time.monotonic()) > 0:
            moved = self._offer_moved  # taken with the look above, in one step of the loop: no change slips by
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), min(left, ATTACH_WAIT_POLL_S))
        what, store = self._offer()
        gate, attempt = self.agent.gate, self.attempt.report.attempt
        if what == "standby":  # start warm, no weights
            return web.json_response({"layout": STANDBY, "attempt": attempt})
        if store is None:
            return web.json_response({"error": {"message": "weights not verified yet"}}, status=503)
        body = {"attach": store.attach_info(), "manifest": store.manifest.to_dict(), "attempt": attempt}
        if gate is not None:  # what the engine does with it (engines.gate): load, fill or map
            body["layout"] = gate.phase if not self.serving else ENGINE
        return web.json_response(body)

    def offer_changed(self) -> None:
        """What ``/v1/attach`` answers may have changed (from any thread): held asks look again now."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: no ask is held any more
                loop.call_soon_threadsafe(self._wake_held_asks)

    def _wake_held_asks(self) -> None:
        moved, self._offer_moved = self._offer_moved, asyncio.Event()
        moved.set()

    def _offer(self) -> tuple[str, WeightStore | None]:
        """What the pod's engine is offered now: ``standby`` (warm, no weights), ``none`` or ``store``."""
        gate = self.agent.gate
        if not self.serving and gate is not None and gate.phase == STANDBY:
            return "standby", None
        store = self.store if self.serving else self.agent.offered
        return ("none", None) if store is None else ("store", store)

    def _attach_key(self) -> tuple[Any, ...]:
        """What ``/v1/attach`` would answer, as a value that changes when the answer does."""
        what, store = self._offer()
        report, gate = self.attempt.report, self.agent.gate
        if what == "store":
            return (what, id(store), gate.phase if gate is not None else None)
        return (what, report.attempt, report.state)

    async def engine_cache_view(self, request: web.Request) -> web.Response:
        """The engine's compile cache as one archive (engine_cache.pack), for a new pod of the set."""
        self._require_token(request)
        return await self._engine_cache.answer(request)

    # ---- the pod's own engine loading from the store (engines.gate) -------------------------------
    async def engine_view(self, request: web.Request) -> web.Response:
        """What a seed's engine holds, per rank: a client's engine must hold the same."""
        self._require_token(request)
        if not self.serving:
            return web.json_response({"error": {"message": "weights not verified yet"}}, status=503)
        gate = self.agent.gate
        ranks = gate.published if gate is not None else {}
        sizes = gate.param_bytes if gate is not None else {}
        return web.json_response(
            {
                "ranks": {str(r): d for r, d in sorted(ranks.items())},
                "paramBytes": {str(r): n for r, n in sorted(sizes.items())},
                "privateBytes": {str(r): n for r, n in sorted(gate.private_bytes.items())} if gate else {},
                "storeBytes": self.store.nbytes,
            }
        )

    async def engine_report(self, request: web.Request) -> web.Response:
        """A rank's proof of its load (``engines.gate``)."""
        return await self._to_gate(request, RankReport.from_json, lambda r: self.agent.gate.report(r), "load")

    async def engine_layout(self, request: web.Request) -> web.Response:
        """A rank loaded its shard from the checkpoint: the layout of its parameters (``engines.gate``)."""
        return await self._to_gate(request, RankLayoutReport.from_json, lambda r: self.agent.gate.layout(r), "layout")

    async def _to_gate(self, request: web.Request, parse: Any, record: Any, what: str) -> web.Response:
        """Parse an engine rank's body (400 naming the field), hand it to the gate, 409 with its reason."""
        self._require_token(request)
        if self.agent.gate is None:
            raise web.HTTPNotFound(text="this agent's engine does not load from the store")
        try:
            body = parse(await self._json(request))
        except ValueError as e:
            raise web.HTTPBadRequest(text=str(e)) from None
        reason = record(body)
        if reason is not None:
            log.warning("refused the engine's %s: %s", what, reason)
            return web.json_response({"ok": False, "reason": reason}, status=409)
        return web.json_response({"ok": True})

    async def engine_failed(self, request: web.Request) -> web.Response:
        self._require_token(request)
        if self.agent.gate is None:
            raise web.HTTPNotFound(text="this agent's engine does not load from the store")
        body = await self._json(request)
        rank, reason = body.get("rank"), body.get("reason")
        if not isinstance(rank, int) or isinstance(rank, bool) or not isinstance(reason, str):
            raise web.HTTPBadRequest(text="rank must be an integer and reason a string")
        log.warning("engine rank %d failed its load: %s", rank, reason)
        self.agent.gate.fail(rank, reason[:2000])
        return web.json_response({"ok": True})

    async def transfer_event(self, request: web.Request) -> web.Response:
        """Our clients announce one-sided (TE) reads, which the seed cannot see, for metrics and load."""
        self._require_token(request)
        body = await self._json(request)
        client, event = str(body.get("client", ""))[:256], body.get("event")
        nbytes = body.get("bytes", 0)
        if isinstance(nbytes, bool) or not isinstance(nbytes, int | float) or not 0 <= nbytes < math.inf:
            raise web.HTTPBadRequest(text="bytes must be a non-negative number")
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
                # A one-sided read is invisible to the seed: take the client's word, but never more than a read
                # of this seed's weights can move.
                limit = self.store.manifest.payload_bytes if self.store is not None else 0
                self.metrics.bytes_served.labels("transfer_engine").inc(min(int(nbytes), limit))
        else:
            raise web.HTTPBadRequest(text="event must be start, done or failed")
        if event == "start":
            self._te_pending = max(0, self._te_pending - 1)
            asyncio.get_running_loop().call_later(self.timeout_s + 0.5, self._te_close)
        else:
            self._te_close()
        return web.json_response({"ok": True})

    # ---- TransferEngine exposure ---------------------------------------------
    def _te_open(self) -> None:
        """A client showed the token and gets the pointers: register the store until its read must be over
        (our clients announce start and end; any read ends within the set's timeout)."""
        store = self.store
        if store.device.type == "cuda":
            torch.cuda.set_device(store.device)  # runs on the event loop's thread
        self.agent.te.register(store.buffer.data_ptr(), store.nbytes)
        self._te_pending += 1
        self._te_until = time.monotonic() + self.timeout_s
        asyncio.get_running_loop().call_later(self.timeout_s + 0.5, self._te_close)

    def _te_close(self) -> None:
        """Unregister the store once no authorised read may still run."""
        te, store = self.agent.te, self.store
        if te is None or store is None:
            return
        now = time.monotonic()
        reading = [c for c, started in self._te_clients.items() if now - started < self.timeout_s]
        if reading or (self._te_pending and now < self._te_until):
            return
        self._te_pending = 0
        te.unregister(store.buffer.data_ptr())

    async def selfcheck(self, request: web.Request) -> web.Response:
        """A client's pull failed its checksums: check this store against its own manifest, once at a time.

        Until the check ends the pod's report says ``serving: false`` (the operator chooses no new clients for
        it); a store that fails stops serving for good and the operator replaces the pod.
        """
        self._require_token(request)
        if not self.serving:
            return web.json_response({"error": {"message": "weights not verified yet"}}, status=503)
        if not self.attempt.checking:
            self.attempt.check_started()
            self._spawn(self._selfcheck(self.store))
        return web.json_response({"checking": True}, status=202)

    async def _selfcheck(self, store: WeightStore) -> None:
        try:
            started = time.monotonic()
            bad = await asyncio.to_thread(store.verify, store.manifest)
            self.metrics.checksum_seconds.observe(time.monotonic() - started)
        except Exception as e:  # a store that cannot be checked is not trusted either
            bad = [f"({type(e).__name__}: {e})"]
        failure = None
        if bad and self.store is store:
            total = len(store.manifest.tensors)
            failure = f"{ERR_SELF_CHECK_FAILED}: {len(bad)} of {total} tensors differ, first {bad[0]}"
            log.error("%s; no longer serving", failure)
            self.metrics.serving.set(0)
        else:
            log.info("self-check passed after a client's checksum mismatch")
        self.attempt.check_ended(failure)

    # ---- SGLang R-Fork, NCCL backend (docs/sglang.md) ----------------------
    async def init_send_group(self, request: web.Request) -> web.Response:
        if not httpguard.authorized(request, self._tokens):
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
        except (KeyError, ValueError, TypeError) as e:
            return _rfork_fail(f"bad request: {e!r}")
        if not self.serving:
            return _rfork_fail("this instance is not serving weights")
        if len(ports) != 1:
            # SGLang asserts one port per TP rank; this agent holds one rank.
            return _rfork_fail(f"expected 1 port (tp_size 1), got {len(ports)}")
        if world_size < 2:
            return _rfork_fail("world_size must be at least 2")
        if master != self.host:
            # The store listens on this pod's own address, never one a client names.
            return _rfork_fail(f"master_address must be this instance's address {self.host}, got {master}")
        if self.group_ports and not self.group_ports[0] <= ports[0] <= self.group_ports[1]:
            lo, hi = self.group_ports
            return _rfork_fail(f"port {ports[0]} lies outside this set's rendezvous ports {lo}-{hi}")
        if not 1 <= ports[0] <= 65535:
            return _rfork_fail(f"port {ports[0]} out of range")
        name = groups.group_name(base, ports[0], 0)
        group = self._groups.get(name)
        if group is None:
            pending = sum(g.pending for g in self._groups.values())
            if pending >= self.max_pending_groups:
                self.metrics.groups_refused.labels("cap").inc()
                return web.json_response(
                    {"success": False, "message": f"{pending} groups pending on this seed, the most it takes "
                                                  f"({self.max_pending_groups}); try another seed or later"},
                    status=429,
                    headers={"Retry-After": str(math.ceil(self.pending_group_s))},
                )  # fmt: skip
            loop = asyncio.get_running_loop()
            group = _SendGroup(name, world_size, loop.create_future())
            self._groups[name] = group
            backend = groups.local_backend(requested, self.store.device)
            self._spawn(self._build_group(group, backend, ports[0]))
        elif group.world_size != world_size:
            return _rfork_fail(f"group {name} exists with world_size {group.world_size}")
        elif group.pending and group.arrived >= group.world_size - 1:
            return _rfork_fail(f"group {name} already has its {group.world_size - 1} members")
        if group.pending:
            group.arrived += 1
            group.last_member = time.monotonic()
        group.members += 1
        self._count_pending()
        try:
            await asyncio.wait_for(asyncio.shield(group.ready), self.timeout_s + 5)
        except asyncio.CancelledError:
            # The member went away (its process died): the others must not wait for it.
            self._abort(group, f"a member of group {name} went away before the group formed", "member_gone")
            raise
        except Exception as e:
            return _rfork_fail(f"failed to build group {name}: {e}")
        finally:
            group.members -= 1
            self._count_pending()
        return web.json_response({"success": True, "message": f"group {name} ready"})

    async def _build_group(self, group: _SendGroup, backend: str, port: int) -> None:
        try:
            group.pg = await asyncio.get_running_loop().run_in_executor(
                self._group_pool, groups.init_group, backend, self.host, port, group.world_size, 0, group.name,
                self.timeout_s, self.store.device, lambda: group.aborted,
            )  # fmt: skip
            group.ready.set_result(True)
            self._count_pending()
            # A client that never asks for the weights must not pin the group (and its port) forever.
            asyncio.get_running_loop().call_later(self.timeout_s, self._expire, group)
        except Exception as e:
            if self._groups.get(group.name) is group:
                self._groups.pop(group.name, None)
            group.ready.set_exception(RuntimeError(group.aborted or str(e)))
            group.ready.exception()  # mark retrieved
            self._count_pending()

    def _expire(self, group: _SendGroup) -> None:
        if group.sent is None and self._groups.get(group.name) is group:
            log.warning("group %s expired without a send request", group.name)
            self._groups.pop(group.name, None)
            groups.destroy_group(group.pg)
            group.pg = None  # the last reference: its store (if the backend still holds it) goes with it

    async def send_weights(self, request: web.Request) -> web.Response:
        self._require_token(request)
        try:
            body = await self._json(request)
            ports = [int(p) for p in str(body["ports"]).split(",")]
            base = str(body.get("group_name", "weight_send_group"))
        except (KeyError, ValueError, TypeError) as e:
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
            group.pg = None  # the last reference: its store (if the backend still holds it) goes with it
            self._set_active(-clients)

    # ---- SGLang R-Fork, TransferEngine backend (docs/sglang.md) ------------
    async def te_info(self, request: web.Request) -> web.Response:
        self._require_token(request)
        try:
            rank = int(request.query["rank"])
        except (KeyError, ValueError):
            return web.json_response({"error": {"message": "Missing or invalid rank parameter"}}, status=400)
        if rank != 0 or not self.serving or self.agent.te is None:
            return web.json_response(
                {"error": {"message": f"Failed to get transfer engine info for rank {rank}"}}, status=400
            )
        self._te_open()
        return web.Response(body=self._te_info_body(self.store, self.agent.te), content_type="application/json")

    def _te_info_body(self, store: WeightStore, te: TransferEngineHandle) -> bytes:
        """The pointers stay valid while a store is served: every client gets the same answer, built once."""
        if self._te_info is None or self._te_info[0] is not store:
            weights = {t.name: [store.data_ptr(t.name), t.numel, t.element_size] for t in store.manifest.tensors}
            body = {"rank": 0, "remote_instance_transfer_engine_info": [te.session_id, weights]}
            self._te_info = (store, json.dumps(body).encode())
        return self._te_info[1]

    async def te_info_deprecated(self, request: web.Request) -> web.Response:
        log.warning(
            "/get_remote_instance_transfer_engine_info is deprecated; use /remote_instance_transfer_engine_info"
        )
        return await self.te_info(request)


def _rfork_fail(message: str) -> web.Response:
    return web.json_response({"success": False, "message": message}, status=400)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
