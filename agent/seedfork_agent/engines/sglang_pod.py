"""In-pod mode for engine ``sglang``: ``seedfork-agent run -- <sglang command>``; SGLang moves its own bytes.

For each assignment the agent renders SGLang's R-Fork launch (``sglang.render_for_pod``), stops the
SGLang of a previous attempt, launches the new one and supervises it (healthy, no silent fallback to
disk, ``/weights_checker`` equal to the seed's). The report says ``verified`` or ``failed`` with the
reason; ``serving`` is whether this SGLang can seed others (a TransferEngine-loaded SGLang 0.5.x
cannot), so the operator picks it as a seed only then. ``bytesDone``/``bytesTotal`` stay 0: SGLang does
not say how many bytes it moved. A failed attempt stops SGLang and waits for the next assignment, which
relaunches SGLang in the same container. If a verified SGLang exits, the report turns ``failed`` and the
operator re-assigns the pod.

SGLang's compile and JIT caches (Triton, DeepGEMM, FlashInfer, Inductor, CUDA's: all under
``SGLANG_CACHE_DIR`` in the pod's engine-cache directory) come from the seed too. Before it launches a client's
SGLang the agent fetches its seed's cache from the seed's agent (never fatal: skipped with an Event); once its
own SGLang is verified (healthy: warm-up, CUDA graphs and DeepGEMM's precompile done), it serves its cache to
later pods on its agent port (``engine_cache_http.CacheListener``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from seedfork_api.contract import AgentReport, Assignment, PodEnv, PodTiming

from ..attempt import AttemptState
from ..engine_cache import CacheKey, CacheSource, EngineCacheError, fetch
from ..engine_cache_http import CacheListener
from ..podloop import PodLoop
from ..server import default_device
from . import sglang
from .sglang import LayoutRefused, SGLangSupervisor, render_for_pod

log = logging.getLogger("seedfork.agent.sglang")

_STOP_GRACE_S = 30.0
# Loading from storage is bounded by the disk, not by the transfer timeout (the operator does not time it out
# either); SGLang's own start (CUDA graphs, warm-up) counts too.
_STORAGE_TIMEOUT_S = 3600.0


class SGLangPod(PodLoop):
    def __init__(self, env: PodEnv, engine_argv: Sequence[str], log_dir: str | None = None) -> None:
        super().__init__(env)
        self.engine_argv = list(engine_argv)
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        self.proc: asyncio.subprocess.Process | None = None
        self.current = AttemptState(env.fingerprint, self.notify)
        self._exit_watch: asyncio.Task | None = None
        self.cache: CacheSource | None = None
        self._cache_listener: CacheListener | None = None
        if env.engine_cache_dir:
            self.cache = CacheSource(env.engine_cache_dir, CacheKey.of_pod(env, default_device()))
            self._cache_listener = CacheListener(env.pod_ip, env.agent_port, env.token, env.token_previous, self.cache)

    def report(self) -> AgentReport:
        return self.current.published()

    def current_timing(self) -> PodTiming | None:
        if self.current.state not in ("verified", "failed"):
            return None
        return self.timing.model_copy(update=self.current.phases())

    def done(self) -> bool:
        return self.current.state == "verified"

    def _fail(self, reason: str) -> None:
        log.warning("attempt %d failed: %s", self.current.report.attempt, reason)
        self.current.fail(reason)

    async def start(self) -> None:
        if self._cache_listener is not None:
            await self._cache_listener.start()

    async def attempt(self, a: Assignment) -> None:
        seed = a.source == "seed"
        self.current.begin(a.attempt, a.source, backend=a.backend if seed else None, seed_pod=a.seed_pod)
        await self.stop_engine()
        self.current.mark(cache_fetch_start=None, cache_fetch_end=None)
        if self.cache is not None:
            self.cache.ready = False  # served again once this attempt's SGLang is verified
            if seed:  # before SGLang starts: it compiles while it starts
                await self._fetch_cache(a)
        self.current.mark(transfer_start=time.time(), transfer_end=None, verified=None, engine_attached=None)
        try:
            launch = render_for_pod(self.engine_argv, self.env, a)
        except LayoutRefused as e:
            self._fail(str(e))
            return
        port = self.env.engine_port
        seed_url = f"http://{a.seed_ip}:{port}" if seed else None
        log_path = self.log_dir / f"sglang-{self.env.pod_name}-attempt-{a.attempt}.log"
        log.info("attempt %d: launching SGLang as %s (log %s): %s", a.attempt, launch.role, log_path, launch.argv)
        try:
            # Kept before supervision starts, so a stop signal during supervision stops this SGLang too.
            self.proc = await sglang.start(launch, str(log_path))
        except OSError as e:  # the command does not exist in this image
            self._fail(f"could not start SGLang: {e}")
            return
        supervisor = SGLangSupervisor(launch, f"http://{self.env.pod_ip}:{port}", seed_url)
        timeout_s = self.env.timeout_seconds if seed else max(self.env.timeout_seconds, _STORAGE_TIMEOUT_S)
        outcome = await supervisor.supervise(timeout_s, sglang.log_reader(str(log_path)), self.proc)
        if outcome.state != "verified":
            await self.stop_engine()
            self._fail(outcome.error or "SGLang supervision failed")
            return
        now = time.time()
        self.current.mark(transfer_end=now, verified=now, engine_attached=now)
        # SGLang does not say how many bytes it moved: bytesDone/bytesTotal stay 0.
        self.current.verified(0, outcome.digest, serving=outcome.can_seed)
        if self.cache is not None:  # healthy: what SGLang compiles while it starts is written
            self.cache.ready = True
        log.info("attempt %d verified (can seed: %s)", a.attempt, outcome.can_seed)
        self._exit_watch = asyncio.create_task(self._watch_exit(self.proc))

    async def _fetch_cache(self, a: Assignment) -> None:
        """The seed's SGLang cache into this pod's (engine_cache.fetch), bounded by the set's timeout; any
        failure is an Event and SGLang compiles, as it would have."""
        assert self.cache is not None
        self.current.mark(cache_fetch_start=time.time())
        url = f"http://{a.seed_ip}:{self.env.agent_port}"
        try:
            got = await asyncio.to_thread(
                fetch, url, self.env.token, self.cache.root, self.cache.key, self.env.timeout_seconds
            )
        except EngineCacheError as e:
            log.warning("engine cache from %s skipped, SGLang compiles itself: %s", a.seed_pod, e)
            await self._event("Warning", "EngineCacheSkipped", f"engine cache from seed {a.seed_pod} skipped: {e}")
        else:
            message = f"engine cache from seed {a.seed_pod}: fetched {got.files} files, {got.bytes} bytes"
            log.info("%s", message)
            await self._event("Normal", "EngineCacheFetched", message)
        self.current.mark(cache_fetch_end=time.time())

    async def _event(self, kind: str, reason: str, message: str) -> None:
        try:
            await self.kube.event(kind, reason, message)
        except Exception as e:  # an Event is for people; the attempt goes on without it
            log.warning("could not post the %s Event: %s", reason, e)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is self.proc and self.current.state == "verified":
            self._fail(f"SGLang exited with code {code} after it was verified")

    async def stop_engine(self) -> None:
        """SIGTERM SGLang's session (its TP workers too) and wait; SIGKILL after the grace period."""
        proc, self.proc = self.proc, None
        if self._exit_watch is not None:
            self._exit_watch.cancel()
            self._exit_watch = None
        if proc is None or proc.returncode is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
                return
            except TimeoutError:
                log.warning("SGLang (pid %d) ignored %s", proc.pid, sig.name)

    async def stop(self) -> None:
        await self.stop_engine()
        if self._cache_listener is not None:
            await self._cache_listener.stop()
