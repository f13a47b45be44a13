"""In-pod mode: follow the pod contract until the weights are verified, then serve.

The operator writes an ``Assignment`` annotation (storage or seed, attempt n);
the agent answers with an ``AgentReport`` and ``PodTiming`` on its own pod. A
failed attempt is reported with its reason and the agent keeps watching its pod
for the next attempt, in the same process.
"""

from __future__ import annotations

import asyncio
import logging
import time

from seedfork_api.contract import AgentReport, Assignment, PodEnv, PodTiming

from .agent import Agent, AgentConfig, EngineHook
from .kube import PodClient

log = logging.getLogger("seedfork.agent.pod")

_PUBLISH_INTERVAL_S = 1.0
_WATCH_S = 20


class PodAgent:
    def __init__(self, env: PodEnv, device: str, hook: EngineHook | None = None) -> None:
        self.env = env
        self.kube = PodClient(env.pod_name, env.namespace)
        self.agent = Agent(
            AgentConfig(
                host=env.pod_ip,
                port=env.agent_port,
                token=env.token,
                fingerprint=env.fingerprint,
                device=device,
                protocol=env.protocol,
                timeout_s=env.timeout_seconds,
                bandwidth_limit_mbps=env.bandwidth_limit_mbps,
                client_id=env.pod_ip,
            ),
            hook,
        )
        self.timing = PodTiming(started=time.time())
        self.seed_pod: str | None = None
        self._dirty = asyncio.Event()
        self._last: dict | None = None
        self._handled = 0
        # One patch at a time, each built when it is sent: a patch built before the attempt finished must
        # never land after one built from the final state (it would leave a stale report or timing).
        self._publishing = asyncio.Lock()

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
            serving=self.agent.server.serving,
            activeClients=self.agent.server.active_clients,
            fingerprint=self.env.fingerprint,
        )

    def current_timing(self) -> PodTiming | None:
        """The timing annotation, written with a final state only; the phases come from the agent's clock."""
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
                "bytes": p.bytes_total,
            }
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        notify = lambda: loop.call_soon_threadsafe(self._dirty.set)  # noqa: E731 (called from threads)
        self.agent.on_progress = notify
        self.agent.server.on_change = notify
        await self.agent.start()
        publisher = asyncio.create_task(self._publish_loop())
        try:
            while True:
                annotations, version = await asyncio.to_thread(self.kube.annotations)
                assignment = Assignment.from_annotations(annotations)
                if self._wants(assignment):
                    await self._attempt(assignment)
                    continue
                await asyncio.to_thread(self._wait_for_change, version)
        finally:
            publisher.cancel()
            await self.agent.stop()
            self.kube.close()

    def _wants(self, a: Assignment | None) -> bool:
        return a is not None and a.attempt > self._handled and not self.agent.server.serving

    def _wait_for_change(self, version: str) -> None:
        try:
            for annotations in self.kube.watch(version, _WATCH_S):
                if self._wants(Assignment.from_annotations(annotations)):
                    return
        except Exception as e:  # expired resourceVersion, apiserver restart: re-read and watch again
            log.info("pod watch ended: %s", e)
            time.sleep(1)

    async def _attempt(self, a: Assignment) -> None:
        self._handled = a.attempt
        self.timing.assigned = a.assigned_at
        self.seed_pod = a.seed_pod
        log.info("attempt %d: source %s seed %s backend %s", a.attempt, a.source, a.seed_pod, a.backend)
        if a.source == "storage":
            if not self.env.model_uri:
                self._fail_now(a, "assigned storage but the pod has no model URI")
                return
            await self.agent.load_storage(self.env.model_uri, a.attempt)
        else:
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
            await self.agent.pull_seed(req, a.attempt)
        await self._publish(force=True)

    def _fail_now(self, a: Assignment, reason: str) -> None:
        p = self.agent.server.progress
        p.attempt, p.state, p.error, p.source = a.attempt, "failed", reason, a.source
        self._dirty.set()

    async def _publish_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), _PUBLISH_INTERVAL_S)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self._publish()
            except Exception as e:
                log.warning("could not patch the pod report: %s", e)

    async def _publish(self, force: bool = False) -> None:
        async with self._publishing:
            report = self.report()
            key = report.model_dump(exclude={"updated_at"})
            if key == self._last and not force:
                return
            await asyncio.to_thread(self.kube.report, report, self.current_timing())
            self._last = key
