"""In-pod mode where the agent moves the bytes: follow the pod contract until the weights are verified, then serve.

Each assignment (storage or seed, attempt n) becomes one ``load_storage`` or ``pull_seed`` of the agent;
``podloop.PodLoop`` watches the pod and publishes the report. A failed attempt is followed by the next
one in the same process.
"""

from __future__ import annotations

import logging

from seedfork_api.contract import AgentReport, Assignment, PodEnv, PodTiming

from .agent import Agent, AgentConfig, EngineHook
from .engine_cache import CacheKey, device_kind
from .engines.gate import EngineGate, EngineWatch
from .podloop import PodLoop

log = logging.getLogger("seedfork.agent.pod")
AGENT_CONTAINER = "seedfork-agent"  # the sidecar's name, as the operator renders it


def _cache_key(env: PodEnv, device: str) -> CacheKey:
    return CacheKey(env.fingerprint, env.engine, env.engine_version, device_kind(device))


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
                engine_cache_key=_cache_key(env, device) if env.engine_cache_dir else None,
            ),
            hook,
            # vLLM loads the weights from this agent's store itself (engines.vllm_loader) and proves it.
            gate=EngineGate(env.tp * env.pp) if env.engine == "vllm" else None,
        )

    def report(self) -> AgentReport:
        p = self.agent.server.progress
        return AgentReport(
            attempt=p.attempt,
            state=p.state,
            source=p.source,
            seedPod=self.seed_pod if p.source == "seed" else None,
            backend=p.backend,
            bytesDone=p.bytes_done,
            bytesTotal=p.bytes_total,
            error=p.error,
            # A seed re-checking its store after a client's checksum mismatch is not offered as a seed meanwhile.
            serving=self.agent.server.serving and not self.agent.server.checking,
            activeClients=self.agent.server.active_clients,
            fingerprint=self.env.fingerprint,
            digest=store.manifest.digest if (store := self.agent.server.store) is not None else None,
            selfChecks=self.agent.server.self_checks,
        )

    def current_timing(self) -> PodTiming | None:
        """Written with a final state only; the phases come from the agent's clock."""
        p = self.agent.server.progress
        if p.state == "failed":
            return self.timing
        if p.state != "verified":
            return None
        t = self.agent.timing
        return self.timing.model_copy(
            update={
                "transfer_start": t.get("transfer_start"),
                "transfer_end": t.get("transfer_end"),
                "verified": t.get("verified"),
                "engine_attached": t.get("engine_attached"),
                "engine_load_start": t.get("engine_load_start"),
                "cache_fetch_start": t.get("cache_fetch_start"),
                "cache_fetch_end": t.get("cache_fetch_end"),
                "engine_ready": t.get("engine_ready"),
                "bytes": p.bytes_total,
            }
        )

    def done(self) -> bool:
        return self.agent.server.serving

    async def start(self) -> None:
        self.agent.on_progress = self.notify
        self.agent.server.on_change = self.notify
        self.agent.on_event = self.kube.event
        await self.agent.start()

    async def stop(self) -> None:
        await self.agent.stop()

    async def attempt(self, a: Assignment) -> None:
        if self.agent.gate is not None:
            self._watch_engine()
        if a.source == "storage":
            if not self.env.model_uri:
                self._fail_now(a, "assigned storage but the pod has no model URI")
                return
            await self.agent.load_storage(self.env.model_uri, a.attempt)
            return
        if not a.seed_ip:
            self._fail_now(a, "assigned a seed without its IP")
            return
        backend = a.backend or ("transfer_engine" if self.env.backend == "auto" else self.env.backend)
        req = self.agent.request(
            a.seed_ip,
            a.seed_agent_port or self.env.agent_port,
            backend,
            group_ports=list(a.group_ports),
            cohort_id=a.cohort_id,
            cohort_rank=a.cohort_rank,
            cohort_size=a.cohort_size,
        )
        await self.agent.pull_seed(req, a.attempt, abort=lambda: self.superseded)

    def abandon(self, attempt: int, source: str | None, reason: str) -> bool:
        p = self.agent.server.progress
        p.attempt, p.state, p.error, p.source = attempt, "failed", reason, source
        p.bytes_done = p.bytes_total = 0
        return True

    def _watch_engine(self) -> None:
        """For an attempt whose engine loads from the store: an engine container that exits while the agent
        waits for its proof ends the attempt at once (it restarts and waits for the next attempt)."""
        watch = EngineWatch()

        def gone() -> str | None:
            try:
                return watch.exited(self.kube.containers(AGENT_CONTAINER))
            except Exception as e:  # an unreadable status is no proof of an exit; the timeout still bounds it
                log.debug("cannot read the engine containers' status: %s", e)
                return None

        self.agent.engine_gone = gone

    def _fail_now(self, a: Assignment, reason: str) -> None:
        p = self.agent.server.progress
        p.attempt, p.state, p.error, p.source = a.attempt, "failed", reason, a.source
        self.notify()
