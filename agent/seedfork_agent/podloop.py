"""The pod contract's loop, whatever moves the bytes: watch the pod for a newer assignment, run it, report.

The operator writes an ``Assignment`` annotation (storage or seed, attempt n); the pod answers with an
``AgentReport`` (and ``PodTiming``) on its own pod. A failed attempt is reported with its reason and the
loop keeps watching for the next attempt, in the same process. Subclasses say how one attempt runs and
what the report says: ``podrun.PodAgent`` (the agent moves the bytes) and ``engines.sglang_pod``
(SGLang moves its own bytes).

Only the pod's current assignment is worked on. A report already on the pod when the process starts was
written by an earlier process of this container, so the attempt it names died with that process: it is
reported failed (where the subclass can, ``abandon``), never run again (a cohort it belonged to is gone).
While an attempt runs the pod is watched too; a newer assignment sets ``superseded`` as soon as the watch
sees it, and the attempt's blocking steps ask, so it ends at once instead of holding the pod until its timeout.

Every Kubernetes call is a coroutine on the loop (``kube.PodClient``): a shutdown or a finished attempt
cancels an open watch at once. Worker threads that must reach the API (an Event, a status read) go through
``from_thread``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import ParamSpec, TypeVar

from seedfork_api.contract import AgentReport, Assignment, PodEnv, PodTiming

from .kube import PodClient

log = logging.getLogger("seedfork.agent.pod")

_PUBLISH_INTERVAL_S = 1.0
_WATCH_S = 20
_WATCH_RETRY_S = 1.0  # after a failed read or watch (expired resourceVersion, apiserver restart)
# A worker thread's wait for its call on the loop: past every call's own request timeout.
_FROM_THREAD_S = 60.0

P = ParamSpec("P")
T = TypeVar("T")


class PodLoop:
    def __init__(self, env: PodEnv) -> None:
        self.env = env
        self.kube = PodClient(env.pod_name, env.namespace)
        self.timing = PodTiming(started=time.time())
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

    def from_thread(self, call: Callable[P, Awaitable[T]]) -> Callable[P, T]:
        """``call`` for a worker thread: it runs on the loop and the thread waits for its result.
        Never for the loop's own thread (it would wait on itself)."""
        loop = self._loop
        assert loop is not None, "from_thread is for after run() started"

        def blocking(*args: P.args, **kwargs: P.kwargs) -> T:
            return asyncio.run_coroutine_threadsafe(call(*args, **kwargs), loop).result(_FROM_THREAD_S)

        return blocking

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.kube.open()
        await self.start()
        publisher = asyncio.create_task(self._publish_loop())
        try:
            await self._after_restart()
            while True:
                await self._attempt(await self._next_assignment(self._wants))
        finally:
            publisher.cancel()
            await self.stop()
            await self.kube.close()

    async def _after_restart(self) -> None:
        annotations, _ = await self.kube.annotations()
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

    async def _next_assignment(self, wanted: Callable[[Assignment], bool]) -> Assignment:
        """The first assignment on the pod that ``wanted`` takes: the current one, else the first change."""
        async with aclosing(self._annotations()) as changes:
            async for annotations in changes:
                try:
                    a = Assignment.from_annotations(annotations)
                except ValueError as e:  # not the operator's writing: wait for one that is, never crash on it
                    log.warning("ignoring a malformed assignment on the pod: %s", e)
                    continue
                if a is not None and wanted(a):
                    return a
        raise AssertionError("unreachable: _annotations never ends by itself")

    async def _annotations(self) -> AsyncIterator[dict[str, str]]:
        """The pod's annotations now, then after each change; read and watched again when a watch times out
        or fails. Ends only when its reader closes it (or is cancelled): that closes the watch too."""
        while True:
            try:
                annotations, version = await self.kube.annotations()
                yield annotations
                async with aclosing(self.kube.watch(version, _WATCH_S)) as changes:
                    async for annotations in changes:
                        yield annotations
            except Exception as e:
                log.info("pod watch ended: %s", e)
                await asyncio.sleep(_WATCH_RETRY_S)

    async def _attempt(self, a: Assignment) -> None:
        self._handled = a.attempt
        self.timing.assigned = a.assigned_at
        log.info("attempt %d: source %s seed %s backend %s", a.attempt, a.source, a.seed_pod, a.backend)
        self.superseded = None
        watcher = asyncio.create_task(self._watch_newer(a.attempt))
        try:
            await self.attempt(a)
        finally:
            watcher.cancel()
        await self._publish(force=True)

    async def _watch_newer(self, attempt: int) -> None:
        newer = await self._next_assignment(lambda a: a.attempt > attempt)
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
            await self.kube.report(report, timing)
            self._last = key
