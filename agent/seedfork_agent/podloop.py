"""The pod contract's loop, whatever moves the bytes: watch the pod for a newer assignment, run it, report.

The operator writes an ``Assignment`` annotation (storage or seed, attempt n); the pod answers with an
``AgentReport`` (and ``PodTiming``) on its own pod. A failed attempt is reported with its reason and the
loop keeps watching for the next attempt, in the same process. Subclasses say how one attempt runs and
what the report says: ``podrun.PodAgent`` (the agent moves the bytes) and ``engines.sglang_pod``
(SGLang moves its own bytes).

Only the pod's current assignment is worked on. A report already on the pod when the process starts was
written by an earlier process of this container, so the attempt it names died with that process: it is
reported failed (where the subclass can, ``abandon``), never run again (a cohort it belonged to is gone).
While an attempt runs the pod is re-read every second; a newer assignment sets ``superseded``, which the
attempt's blocking steps ask, so it ends at once instead of holding the pod until its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time

from seedfork_api.contract import AgentReport, Assignment, PodEnv, PodTiming

from .kube import PodClient

log = logging.getLogger("seedfork.agent.pod")

_PUBLISH_INTERVAL_S = 1.0
_WATCH_S = 20
_NEWER_POLL_S = 1.0


class PodLoop:
    def __init__(self, env: PodEnv) -> None:
        self.env = env
        self.kube = PodClient(env.pod_name, env.namespace)
        self.timing = PodTiming(started=time.time())
        self.seed_pod: str | None = None
        self._dirty = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: dict | None = None
        self._handled = 0
        self.superseded: str | None = None  # set while an attempt runs and a newer one was assigned
        # One patch at a time, each built when it is sent: a patch built before the attempt finished must
        # never land after one built from the final state (it would leave a stale report or timing).
        self._publishing = asyncio.Lock()

    # ---- what a subclass provides ------------------------------------------
    def report(self) -> AgentReport:
        raise NotImplementedError

    def current_timing(self) -> PodTiming | None:
        """The timing annotation, or None while the attempt has no final state."""
        raise NotImplementedError

    def done(self) -> bool:
        """True once the weights are verified: an assignment written after that is not taken."""
        raise NotImplementedError

    async def attempt(self, a: Assignment) -> None:
        """Run one attempt to its end (verified or failed)."""
        raise NotImplementedError

    def abandon(self, attempt: int, source: str | None, reason: str) -> bool:
        """Report ``attempt`` failed without running it (an earlier process of this container had it).
        False where the subclass cannot (it then runs the attempt again)."""
        return False

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    # ---- the loop -----------------------------------------------------------
    def notify(self) -> None:
        """The report may have changed; safe to call from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._dirty.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.start()
        publisher = asyncio.create_task(self._publish_loop())
        try:
            await self._after_restart()
            while True:
                annotations, version = await asyncio.to_thread(self.kube.annotations)
                assignment = Assignment.from_annotations(annotations)
                if self._wants(assignment):
                    await self._attempt(assignment)
                    continue
                await asyncio.to_thread(self._wait_for_change, version)
        finally:
            publisher.cancel()
            await self.stop()
            self.kube.close()

    async def _after_restart(self) -> None:
        annotations, _ = await asyncio.to_thread(self.kube.annotations)
        old = AgentReport.from_annotations(annotations)
        if old is None or old.attempt < 1:
            return
        if old.state == "failed":
            self._handled = old.attempt
            return
        reason = f"the agent restarted during attempt {old.attempt} (was {old.state}); that attempt is abandoned"
        if self.abandon(old.attempt, old.source, reason):
            log.warning("%s", reason)
            self._handled = old.attempt
            await self._publish(force=True)

    def _wants(self, a: Assignment | None) -> bool:
        # queued: the operator expects a slot soon; nothing to run until the assignment that names it
        return a is not None and a.source != "queued" and a.attempt > self._handled and not self.done()

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
        self.superseded = None
        watcher = asyncio.create_task(self._watch_newer(a.attempt))
        try:
            await self.attempt(a)
        finally:
            watcher.cancel()
        await self._publish(force=True)

    async def _watch_newer(self, attempt: int) -> None:
        while self.superseded is None:
            await asyncio.sleep(_NEWER_POLL_S)
            try:
                annotations, _ = await asyncio.to_thread(self.kube.annotations)
                newer = Assignment.from_annotations(annotations)
            except Exception as e:  # the apiserver is away: the attempt's own timeout still bounds it
                log.info("could not re-read the pod: %s", e)
                continue
            if newer is not None and newer.attempt > attempt:
                self.superseded = f"attempt {attempt} was superseded by attempt {newer.attempt}"
                log.warning("%s", self.superseded)

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
            report, timing = self.report(), self.current_timing()
            # Timing too: a phase after the report's final state (the engine's API up) must still land.
            key = (report.model_dump(exclude={"updated_at"}), timing.model_dump() if timing else None)
            if key == self._last and not force:
                return
            await asyncio.to_thread(self.kube.report, report, timing)
            self._last = key
