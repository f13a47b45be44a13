"""In-pod mode where the agent moves the bytes: follow the pod contract until the weights are verified, then serve.

Each assignment (storage or seed, attempt n) becomes one ``load_storage`` or ``pull_seed`` of the agent;
``podloop.PodLoop`` watches the pod and publishes the report. A failed attempt is followed by the next
one in the same process.
"""

from __future__ import annotations

import asyncio
import logging
import time

from seedfork_api import engines
from seedfork_api.contract import AgentReport, Assignment, PodEnv, PodTiming

from .agent import Agent, AgentConfig, EngineHook
from .engine_cache import CacheKey
from .engineprobe import EngineProbe, HealthProbe, phases
from .engines.gate import EngineGate, EngineWatch
from .podloop import PodLoop

log = logging.getLogger("seedfork.agent.pod")
AGENT_CONTAINER = "seedfork-agent"  # the sidecar's name, as the operator renders it
STANDBY_CHECK_S = 1.0  # how often a standby asks whether its engine still answers
STANDBY_MISSES = 3  # consecutive unanswered checks after which the standby's engine counts as dead


def _gate(env: PodEnv, hook: EngineHook | None) -> EngineGate | None:
    """Where the engine proves its load (vLLM through ``engines.vllm_loader``, the reference engine's attach):
    the agent reports the attempt verified only once the engine has. An engine hook hands the weights in
    itself and returns only once the engine took them (it raises otherwise): that engine never attaches, so
    it reports nothing to a gate."""
    row = engines.of(env.engine)
    if hook is not None or not row.proves_load:
        return None
    return EngineGate(env.tp * env.pp, engine_layout=row.agent == "store_loader")


class PodAgent(PodLoop):
    def __init__(self, env: PodEnv, device: str, hook: EngineHook | None = None) -> None:
        super().__init__(env)
        self.agent = Agent(
            AgentConfig(
                host=env.pod_ip,
                port=env.agent_port,
                token=env.token,
                token_previous=env.token_previous,
                fingerprint=env.fingerprint,
                device=device,
                protocol=env.protocol,
                timeout_s=env.timeout_seconds,
                bandwidth_limit_mbps=env.bandwidth_limit_mbps,
                client_id=env.pod_ip,
                port_range=env.port_range,
                # A set that moves bytes over nccl never reads TransferEngine: expose no memory to it.
                serve_te=env.backend != "nccl",
                max_pending_groups=env.max_clients_per_seed,
                engine_health_url=f"http://{env.pod_ip}:{env.engine_port}/health",
                engine_cache_dir=env.engine_cache_dir,
                engine_cache_key=CacheKey.of_pod(env, device) if env.engine_cache_dir else None,
            ),
            hook,
            gate=_gate(env, hook),
            on_change=self.notify,
        )
        self.probe = (
            EngineProbe(env.pod_ip, env.engine_port, env.token)
            if engines.of(env.engine).publishes_phases
            else HealthProbe(env.pod_ip, env.engine_port)
        )
        self._engine_phases: dict[str, float] = {}
        self._engine_task: asyncio.Task | None = None

    def report(self) -> AgentReport:
        return self.agent.attempt.published()

    def current_timing(self) -> PodTiming | None:
        """Written with a final state (and a warm standby's); the phases come from the agent's clock (its
        attempt's, only once verified) and the engine's own (``engineprobe``)."""
        attempt = self.agent.attempt
        engine = self._engine_timing()
        if attempt.state in ("failed", "standby"):
            return self.timing.model_copy(update=engine)
        if attempt.state != "verified":
            return None
        return self.timing.model_copy(update={**engine, **attempt.phases(), "bytes": attempt.report.bytes_total})

    def _engine_timing(self) -> dict[str, float | None]:
        e = self._engine_phases
        return {"engine_start": e.get("started"), "engine_up": e.get("up"), "engine_verified": e.get("verified")}

    def done(self) -> bool:
        return self.agent.serving

    async def start(self) -> None:
        self.agent.on_event = self.from_thread(self.kube.event)  # posted from the agent's worker threads
        await self.agent.start()

    async def stop(self) -> None:
        await self.agent.stop()

    async def attempt(self, a: Assignment) -> None:
        if self._engine_task is not None:  # a standby's engine watch: this attempt is its promotion
            self._engine_task.cancel()
            self._engine_task = None
        if a.source == "standby":
            await self._standby(a)
            return
        if self.agent.gate is not None:
            self._watch_engine()
        try:
            await self._load(a)
        finally:
            if self.agent.serving and engines.of(self.env.engine).publishes_phases:
                self._engine_task = asyncio.create_task(self._record_engine_verified())

    async def _standby(self, a: Assignment) -> None:
        """Bring the pod to a warm standby, then return: the pod loop's watch takes the promotion at once.

        The engine must answer within the set's timeout; a warm standby then waits without bound (it is not
        a replica) while ``_watch_standby`` checks that its engine still answers: one that stops, or restarts,
        fails the standby and the operator replaces it. Once promoted, the next attempt is bounded as any is."""
        self.agent.attempt.standby(a.attempt)
        if not engines.of(self.env.engine).standby:
            self._fail_now(a, f"standby is not built for engine {self.env.engine}")
            return
        if self.agent.gate is not None:  # the engine starts without weights and waits for the promotion's store
            self.agent.gate.standby()
        deadline = time.time() + self.env.timeout_seconds
        info = await self.probe.wait(lambda i: "up" in phases(i), deadline, lambda: self.superseded)
        if self.superseded:
            return
        if info is None:
            self._fail_now(a, f"the standby's engine did not answer within {self.env.timeout_seconds:.0f}s")
            return
        self._engine_phases = phases(info)
        if self.agent.config.serve_te:  # warm the transfer path too: TransferEngine starts before the promotion
            try:
                await asyncio.to_thread(self.agent.transfer_engine)
            except Exception as e:  # the pull then starts it (and reports what fails)
                log.warning("standby could not start TransferEngine ahead: %s", e)
        self.timing.standby_warm = time.time()
        self.agent.attempt.warm()
        log.info("standby warm: engine up, waiting for a promotion")
        self._engine_task = asyncio.create_task(self._watch_standby(a, self._engine_phases.get("started")))

    async def _watch_standby(self, a: Assignment, started: float | None) -> None:
        misses = 0
        while True:
            await asyncio.sleep(STANDBY_CHECK_S)
            info = await self.probe.info()
            misses = 0 if info is not None else misses + 1
            restarted = info is not None and phases(info).get("started") != started
            if misses >= STANDBY_MISSES or restarted:
                why = "restarted" if restarted else f"stopped answering ({misses} checks)"
                log.warning("standby failed: its engine %s", why)
                self._fail_now(a, f"the standby's engine {why}")
                return

    async def _record_engine_verified(self) -> None:
        """The engine's own phases once it re-checked the weights and serves them (bounded by the timeout)."""
        deadline = time.time() + self.env.timeout_seconds
        info = await self.probe.wait(lambda i: i.get("state") in ("ready", "failed"), deadline, poll_s=0.25)
        if info is None:
            return
        self._engine_phases = phases(info)
        await self._publish(force=True)

    async def _load(self, a: Assignment) -> None:
        if a.source == "storage":
            if not self.env.model_uri:
                self._fail_now(a, "assigned storage but the pod has no model URI")
                return
            await self.agent.load_storage(self.env.model_uri, a.attempt)
            return
        if not a.seed_ip:
            self._fail_now(a, "assigned a seed without its IP")
            return
        backend = a.backend or engines.resolve_backend(self.env.backend, self.env.engine)
        req = self.agent.request(
            a.seed_ip,
            a.seed_agent_port or self.env.agent_port,
            backend,
            group_ports=list(a.group_ports),
            cohort_id=a.cohort_id,
            cohort_rank=a.cohort_rank,
            cohort_size=a.cohort_size,
        )
        await self.agent.pull_seed(req, a.attempt, abort=lambda: self.superseded, seed_pod=a.seed_pod)

    def abandon(self, attempt: int, source: str | None, reason: str) -> bool:
        # A fresh process: nothing of that attempt's bytes is here, and its seed is not named again.
        self.agent.attempt.refused(attempt, source, reason)
        return True

    def _watch_engine(self) -> None:
        """For an attempt whose engine loads from the store: an engine container that exits while the agent
        waits for its proof ends the attempt at once (it restarts and waits for the next attempt)."""
        watch = EngineWatch()
        containers = self.from_thread(self.kube.containers)  # asked from the worker thread that waits

        def gone() -> str | None:
            try:
                return watch.exited(containers(AGENT_CONTAINER))
            except Exception as e:  # an unreadable status is no proof of an exit; the timeout still bounds it
                log.debug("cannot read the engine containers' status: %s", e)
                return None

        self.agent.engine_gone = gone

    def _fail_now(self, a: Assignment, reason: str) -> None:
        self.agent.attempt.refused(a.attempt, a.source, reason, a.seed_pod)
