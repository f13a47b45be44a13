"""One agent: its store, its TransferEngine, its attempt state, the steps that fill the store, and the HTTP
server that reads them.

``load_storage`` and ``pull_seed`` each run one attempt and end in ``verified``
(serving) or ``failed`` (everything freed, reason kept); a failed attempt can be
followed by another in the same process. An engine hook, when given, is called
with the verified store before the agent reports it (the engine adapters plug in
here). The agent alone changes what it holds; the server only reads it (``server.Holder``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from seedfork_api.contract import Source, group_ports, transfer_engine_ports
from seedfork_api.spec import PortRange

from . import plainhttp
from .attempt import AttemptState
from .checksum import warm_up
from .engine_cache import CacheKey, CacheSource, EngineCacheError, fetch
from .engines.engine_store import engine_manifest, rank_digest, ranks_of
from .engines.gate import CHECKPOINT, ENGINE, STANDBY, EngineGate, EngineGateError, seed_engine_digests
from .puller import PullError, PullRequest, pull
from .server import AgentServer, Metrics
from .store import Manifest, WeightStore, remove_stale_shm
from .te import TransferEngineError, TransferEngineHandle, engine, resolve_protocol

log = logging.getLogger("seedfork.agent")

EngineHook = Callable[[WeightStore, dict[str, Any]], None]
_ENGINE_POLL_S = 0.5
PORTS = PortRange()  # the CRD's default range, for an agent run by hand


@dataclass
class AgentConfig:
    host: str
    port: int
    token: str
    fingerprint: str
    device: str = "cpu"
    token_previous: str | None = None  # during a token rotation's grace period (the Secret's "previous")
    protocol: str = "auto"  # TransferEngine transport
    serve_te: bool = True  # publish TransferEngine info as a seed
    timeout_s: float = 300.0
    bandwidth_limit_mbps: int | None = None
    client_id: str = ""
    # The set's transfer ports (inclusive): TransferEngine and rendezvous listeners stay inside (contract).
    port_range: tuple[int, int] = (PORTS.start, PORTS.end)
    max_pending_groups: int = 4  # the set's maxClientsPerSeed: group creations one seed lets wait at once
    # The pod's engine: its health URL (when its API came up, the end of its compile/warm-up), and the
    # directory its compile caches live in, with the key that says where they are valid (engine_cache).
    engine_health_url: str | None = None
    engine_cache_dir: str | None = None
    engine_cache_key: CacheKey | None = None


def load_hook(spec: str | None) -> EngineHook | None:
    """``module:callable`` → the callable (the engine adapter's entry point)."""
    if not spec:
        return None
    import importlib

    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"engine hook must look like module:callable, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        hook: EngineHook | None = None,
        gate: EngineGate | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """``on_change``: called (no arguments, from any thread) whenever the attempt's state changes."""
        removed = remove_stale_shm()
        if removed:
            log.info("removed %d store files of dead agent processes", len(removed))
        self.config = config
        self.device = torch.device(config.device)
        self.protocol = resolve_protocol(config.protocol, self.device)
        self.hook = hook
        self.on_change = on_change
        self.attempt = AttemptState(config.fingerprint, self._changed)
        self.metrics = Metrics()
        self.store: WeightStore | None = None  # verified and served
        # Engines that load from the store themselves (vLLM): the verified store is offered to the pod's own
        # engine before this agent serves it to anyone, and the gate collects the engine's proof of its load.
        self.offered: WeightStore | None = None
        self.gate = gate
        self.te: TransferEngineHandle | None = None  # set while a store is served over TransferEngine
        # The engine's compile cache, offered to new pods once the engine finished compiling (engine_cache).
        self.engine_cache: CacheSource | None = None
        if config.engine_cache_dir and config.engine_cache_key:
            self.engine_cache = CacheSource(config.engine_cache_dir, config.engine_cache_key)
        self.server = AgentServer(
            config.host,
            config.port,
            config.token,
            self,
            token_previous=config.token_previous,
            timeout_s=config.timeout_s,
            bandwidth_limit_mbps=config.bandwidth_limit_mbps,
            group_ports=group_ports(*config.port_range),
            max_pending_groups=config.max_pending_groups,
        )
        # Called with (type, reason, message) for what the pod should show as an Event (a skipped cache).
        self.on_event: Callable[[str, str, str], None] | None = None
        self.engine_cache_result: str | None = None
        self._engine_watch: asyncio.Task | None = None
        # Set by the pod loop: says why the engine can no longer prove its load (its container exited).
        self.engine_gone: Callable[[], str | None] | None = None
        self._warm: asyncio.Task | None = None

    @property
    def serving(self) -> bool:
        return self.store is not None and self.attempt.serving

    def _changed(self) -> None:
        """The attempt changed (from any thread): the pod loop publishes it, and the engine's held ask for its
        weights looks again now."""
        self.server.offer_changed()
        if self.on_change is not None:
            self.on_change()

    def transfer_engine(self) -> TransferEngineHandle:
        """The process's TransferEngine, started on first use inside the set's ports."""
        ports = transfer_engine_ports(*self.config.port_range)
        return engine(self.config.host, self.protocol, self.config.timeout_s, ports)

    async def start(self) -> None:
        await self.server.start()
        if self.device.type == "cuda":  # compile the GPU checksum kernel now, not on the first pull's clock
            self._warm = asyncio.create_task(asyncio.to_thread(warm_up, self.device))

    async def stop(self) -> None:
        if self._engine_watch is not None:
            self._engine_watch.cancel()
        await self.server.stop()
        if self.store is not None:
            self.store.close()

    # ---- attempts ---------------------------------------------------------
    def _fail(self, reason: str) -> None:
        log.warning("attempt %d failed: %s", self.attempt.report.attempt, reason)
        self.attempt.fail(reason)

    def _verified(self, store: WeightStore, transfer_end: float | None = None) -> None:
        now = time.time()
        # A pull reports when its last byte landed, so Time-to-Ready splits transfer from verification;
        # a storage load checksums as it loads: one phase.
        self.attempt.mark(transfer_end=transfer_end or now, verified=now)
        if self.hook:
            self.hook(store, {"attach": store.attach_info(), "manifest": store.manifest.to_dict()})
            self.attempt.mark(engine_attached=time.time())
        if self.gate is not None:  # the engine loads from the store itself: it must prove it holds the weights
            store = self._engine_load(store)
        self._serve(store)
        self.attempt.verified(store.manifest.payload_bytes, store.manifest.digest)
        r = self.attempt.report
        log.info("attempt %d verified: %d bytes, %d tensors", r.attempt, r.bytes_total, len(store.manifest.tensors))

    def _serve(self, store: WeightStore) -> None:
        """Start serving a verified store. Its memory is exposed to TransferEngine only while a client that
        showed the token may read it (the server's ``_te_open``): a store a pull left registered is
        unregistered here."""
        if store.device.type == "cuda":
            torch.cuda.set_device(store.device)  # this may run in a worker thread: make its CUDA context current
        if self.config.serve_te:
            try:
                self.te = self.transfer_engine()
                self.te.unregister(store.buffer.data_ptr())
            except TransferEngineError as e:  # NCCL/gloo still work without it
                log.warning("not serving over TransferEngine: %s", e)
                self.te = None
        self.store = store
        self.metrics.serving.set(1)

    def _engine_load(self, store: WeightStore) -> WeightStore:
        """Offer ``store`` to the engine and wait for its proof (``engines.gate``); returns the store to serve,
        which is the engine's own parameters: a checkpoint store is freed once the engine has loaded it."""
        self.offered = store
        self.server.offer_changed()  # on a promotion the engine's held ask is the critical path
        if self.gate.phase == CHECKPOINT:
            layouts = self.gate.wait_layouts(self.config.timeout_s, self.engine_gone)
            filled = WeightStore.empty(engine_manifest(layouts, self.config.fingerprint), self.config.device)
            try:
                self.offered = filled
                self.gate.fill(filled.manifest.digest)
                self.server.offer_changed()
                store.close()  # every rank has its shard in its own parameters now: the checkpoint copy goes
                reports = self.gate.wait(self.config.timeout_s, self.engine_gone)
                filled.manifest = filled.manifest.with_checksums(filled.compute_checksums())
                for rank, report in sorted(reports.items()):
                    if report.params_digest != rank_digest(filled.manifest, rank):
                        raise EngineGateError(
                            f"engine rank {rank}'s parameters are not the bytes it wrote to the engine store"
                        )
                self.gate.settle(filled.manifest.digest)
            except BaseException:
                self.offered = None
                filled.close()
                raise
            store = filled
        else:
            reports = self.gate.wait(self.config.timeout_s, self.engine_gone)
        self.attempt.mark(engine_attached=time.time())
        starts = [r.started_at for r in reports.values() if r.started_at is not None]
        if starts:
            self.attempt.mark(engine_load_start=min(starts))
        return store

    def _begin(
        self,
        attempt: int,
        source: Source,
        backend: str | None = None,
        seed: str | None = None,
        seed_pod: str | None = None,
    ) -> None:
        self.attempt.mark(transfer_start=time.time())
        self.attempt.begin(attempt, source, backend, seed, seed_pod)

    async def load_storage(self, uri: str, attempt: int = 1) -> bool:
        if self.serving:
            return True
        self._begin(attempt, "storage")
        try:
            store = await asyncio.to_thread(
                WeightStore.from_safetensors, uri, self.config.fingerprint, self.config.device
            )
        except Exception as e:
            self._fail(f"loading {uri} failed: {type(e).__name__}: {e}")
            return False
        if self.gate is not None:
            # From storage: an engine of its own layout loads the checkpoint, and its own parameters become this
            # pod's store; an engine that maps the store proves the checkpoint's bytes as they are.
            self.gate.open(store.manifest.digest, None, CHECKPOINT if self.gate.engine_layout else ENGINE)
        return await self._finish(store)

    async def pull_seed(
        self,
        req: PullRequest,
        attempt: int = 1,
        abort: Callable[[], str | None] | None = None,
        seed_pod: str | None = None,
    ) -> bool:
        """One attempt from the seed ``req`` names; ``seed_pod``: its pod's name, for the report."""
        if self.serving:
            return True
        # A promoted standby's engine compiled while it warmed up: its cache is in use, nothing to fetch.
        warm = self.gate is not None and self.gate.phase == STANDBY
        self._begin(attempt, "seed", req.backend, req.seed, seed_pod)
        stats: dict[str, float] = {}
        try:
            store = await asyncio.to_thread(pull, req, self.transfer_engine, self.attempt.moved, stats, abort)
        except PullError as e:
            self._fail(str(e))
            self.metrics.transfers.labels("client", req.backend, "failed").inc()
            return False
        phases = ", ".join(f"{k[:-2]} {v * 1000:.0f} ms" for k, v in stats.items() if k.endswith("_s"))
        log.info("pulled %d bytes from %s over %s: %s", store.manifest.payload_bytes, req.seed, req.backend, phases)
        self.metrics.transfers.labels("client", req.backend, "ok").inc()
        started = self.attempt.timing.transfer_start
        self.metrics.duration.labels("client", req.backend).observe(time.time() - started)
        if self.gate is not None:
            try:
                self.gate.open(store.manifest.digest, await self._seed_engine(req, store), ENGINE)
            except (EngineGateError, OSError, ValueError) as e:
                store.close()
                self._fail(f"seed {req.seed}: {e}")
                return False
        if self.engine_cache is not None and not warm:  # before the weights: the engine compiles after
            await asyncio.to_thread(self._fetch_engine_cache, req)
        return await self._finish(store, stats.get("data_end"))

    async def _seed_engine(self, req: PullRequest, store: WeightStore) -> dict[int, str] | None:
        """What this pod's engine must come to hold, rank by rank: the seed's engine's parameter digests where
        the engine has a layout of its own (None where it maps the store: the manifest digest then proves it)."""
        if not self.gate.engine_layout:
            return None
        expected = await asyncio.to_thread(seed_engine_digests, req.base_url, req.token, req.timeout_s)
        if ranks_of(store.manifest) != set(range(self.gate.ranks)):
            raise ValueError(f"the seed serves no engine-layout store for {self.gate.ranks} ranks")
        stale = [r for r, d in sorted(expected.items()) if d != rank_digest(store.manifest, r)]
        if stale:  # what the seed serves must be what its engine holds
            raise ValueError(f"the seed's store is not what its engine holds for ranks {stale}")
        return expected

    def _fetch_engine_cache(self, req: PullRequest) -> None:
        """The seed's compile cache into this pod's (still unused) cache directory; any failure is skipped."""
        source = self.engine_cache
        self.attempt.mark(cache_fetch_start=time.time())
        try:
            got = fetch(req.base_url, req.token, source.root, source.key, self.config.timeout_s, source.max_bytes)
        except EngineCacheError as e:
            self.engine_cache_result = f"skipped: {e}"
            log.warning("engine cache from %s skipped, the engine compiles itself: %s", req.seed, e)
            self._event("Warning", "EngineCacheSkipped", f"engine cache from seed {req.seed} skipped: {e}")
        else:
            self.engine_cache_result = f"fetched {got.files} files, {got.bytes} bytes"
            log.info("engine cache from %s: %s", req.seed, self.engine_cache_result)
            message = f"engine cache from seed {req.seed}: {self.engine_cache_result}"
            self._event("Normal", "EngineCacheFetched", message)
        self.attempt.mark(cache_fetch_end=time.time())

    def _event(self, kind: str, reason: str, message: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, reason, message)
        except Exception as e:  # an Event is for people; never a reason to fail the pod
            log.info("could not post event %s: %s", reason, e)

    async def _finish(self, store: WeightStore, transfer_end: float | None = None) -> bool:
        try:
            await asyncio.to_thread(self._verified, store, transfer_end)
        except Exception as e:
            if self.te is not None:
                self.te.unregister(store.buffer.data_ptr())
            self.store = self.offered = None
            if self.gate is not None:
                self.gate.close()
            store.close()
            self._fail(f"could not start serving: {type(e).__name__}: {e}")
            return False
        if self.config.engine_health_url and self._engine_watch is None:
            self._engine_watch = asyncio.get_running_loop().create_task(self._watch_engine_api())
        return True

    async def _watch_engine_api(self) -> None:
        """Until the engine's API answers (bounded by the set's timeout): the end of its compile/warm-up.
        Only then is its compile cache complete, so only then is it offered to other pods."""
        url = self.config.engine_health_url
        deadline = time.monotonic() + self.config.timeout_s
        async with httpx.AsyncClient(timeout=5, verify=plainhttp.verify(url)) as http:
            while time.monotonic() < deadline:
                try:
                    if (await http.get(url)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(_ENGINE_POLL_S)
            else:
                log.warning("the engine's API at %s did not come up within %.0f s", url, self.config.timeout_s)
                return
        if self.engine_cache is not None:
            self.engine_cache.ready = True
        log.info("the engine's API is up at %s", url)
        self.attempt.mark(engine_ready=time.time(), publish=True)

    async def adopt(self, store: WeightStore) -> bool:
        """Serve a store the caller built and checksummed itself (an engine's own weights, a benchmark)."""
        self._begin(self.attempt.report.attempt + 1, "storage")
        return await self._finish(store)

    def release(self) -> None:
        """Stop serving and free the store (its TransferEngine registration too)."""
        store, self.store, self.offered = self.store, None, None
        if self.gate is not None:
            self.gate.close()
        self.attempt.released()
        self.metrics.serving.set(0)
        if store is not None:
            if self.te is not None:
                self.te.unregister(store.buffer.data_ptr())
            store.close()

    def request(self, seed_ip: str, seed_port: int, backend: str, **kw: Any) -> PullRequest:
        """A pull request carrying this agent's identity, token, device and timeout."""
        expected: Manifest | None = kw.pop("expected", None)
        return PullRequest(
            seed_ip=seed_ip,
            seed_port=seed_port,
            token=kw.pop("token", self.config.token),
            token_previous=kw.pop("token_previous", self.config.token_previous),
            backend=backend,
            fingerprint=self.config.fingerprint,
            client_id=self.config.client_id or self.config.host,
            timeout_s=self.config.timeout_s,
            device=self.config.device,
            expected=expected,
            local_ip=self.config.host,
            **kw,
        )
