"""The pod loop's own Kubernetes I/O against a real kube-apiserver: its watches end at once, on a shutdown
and on a newer assignment, instead of at their timeout or at the next poll; a malformed assignment is
skipped, never the end of the loop; the pod client reads, watches and reports as JSON, with no API client
(and TLS context) built per watch, and an error status still raises."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from kubernetes import client
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from seedfork_agent.kube import PodClient
from seedfork_agent.podloop import PodLoop
from seedfork_api import contract as c

pytestmark = pytest.mark.cluster


class _Loop(PodLoop):
    """Attempt 1 writes attempt 2 onto its own pod and runs until it sees that; attempt 2 ends at once."""

    def __init__(self, env: c.PodEnv, core: client.CoreV1Api) -> None:
        super().__init__(env)
        self.core = core
        self.attempts: list[int] = []
        self.superseded_after: float | None = None  # seconds from the newer assignment's write to superseded
        self.reasons: list[str | None] = []
        self.second_done = asyncio.Event()

    def report(self) -> c.AgentReport:
        return c.AgentReport(attempt=max(self.attempts, default=0), state="pending")

    def current_timing(self) -> c.PodTiming | None:
        return None

    def done(self) -> bool:
        return False

    async def attempt(self, a: c.Assignment) -> None:
        self.attempts.append(a.attempt)
        if a.attempt == 1:
            newer = c.annotation_patch(assignment=c.Assignment(attempt=2, source="storage"))
            await asyncio.to_thread(self.core.patch_namespaced_pod, self.env.pod_name, self.env.namespace, newer)
            written = time.monotonic()
            for _ in range(1000):  # 10 s at most
                if self.superseded is not None:
                    break
                await asyncio.sleep(0.01)
            self.superseded_after = time.monotonic() - written
        self.reasons.append(self.superseded)
        if a.attempt == 2:
            self.second_done.set()


def _pod(core: client.CoreV1Api, namespace: str, name: str, assignment: c.Assignment | None) -> c.PodEnv:
    annotations = {c.ANN_ASSIGNMENT: assignment.to_json()} if assignment else {}
    body = {
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "engine", "image": "seedfork/agent:test"}]},
    }
    core.create_namespaced_pod(namespace, body)
    return c.PodEnv(pod_name=name, namespace=namespace, set_name="demo", token="t")


async def _run_until(loop: PodLoop, until) -> float:
    """Run ``loop`` until the coroutine ``until`` returns, then shut it down as SIGTERM does; returns when
    the shutdown began."""
    task = asyncio.create_task(loop.run())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(until, 30)
    task.cancel()
    cancelled = time.monotonic()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return cancelled


def test_shutdown_while_the_pod_is_watched_ends_the_process_at_once(api_client, namespace):
    core = client.CoreV1Api(api_client)
    loop = _Loop(_pod(core, namespace, "idle-0", None), core)
    # No assignment: the loop sits in its pod watch (20 s long) by the time a second has passed.
    cancelled = asyncio.run(_run_until(loop, asyncio.sleep(1.0)))
    # asyncio.run returns only once its worker threads are done: none may still sit in a watch.
    assert time.monotonic() - cancelled < 1.0
    assert loop.attempts == []


def test_a_newer_assignment_supersedes_the_running_attempt_at_once(api_client, namespace):
    core = client.CoreV1Api(api_client)
    loop = _Loop(_pod(core, namespace, "busy-0", c.Assignment(attempt=1, source="storage")), core)
    asyncio.run(_run_until(loop, loop.second_done.wait()))
    assert loop.attempts == [1, 2]
    assert loop.reasons == ["attempt 1 was superseded by attempt 2", None]
    # The watch sees the write; a re-read of the pod each second would see it a second after the attempt began.
    assert loop.superseded_after is not None and loop.superseded_after < 0.5, loop.superseded_after


def test_a_malformed_assignment_is_skipped_and_the_next_good_one_runs(api_client, namespace):
    core = client.CoreV1Api(api_client)
    env = _pod(core, namespace, "odd-0", None)
    core.patch_namespaced_pod("odd-0", namespace, {"metadata": {"annotations": {c.ANN_ASSIGNMENT: '{"attempt": "x"'}}})
    loop = _Loop(env, core)

    async def then_a_good_one() -> None:
        await asyncio.sleep(1.0)  # the loop has read the malformed one by now
        good = c.annotation_patch(assignment=c.Assignment(attempt=2, source="storage"))
        await asyncio.to_thread(core.patch_namespaced_pod, "odd-0", namespace, good)
        await loop.second_done.wait()

    asyncio.run(_run_until(loop, then_a_good_one()))
    assert loop.attempts == [2]


def test_the_pod_client_reads_watches_and_reports_with_no_client_built_per_watch(api_client, namespace, monkeypatch):
    core = client.CoreV1Api(api_client)
    env = _pod(core, namespace, "io-0", c.Assignment(attempt=1, source="storage"))
    built: list[int] = []

    async def scenario() -> tuple[dict[str, str], list[dict[str, str]], dict]:
        kube = PodClient(env.pod_name, namespace)
        await kube.open()
        init = ApiClient.__init__

        def counted(self, *args, **kwargs):
            built.append(1)
            init(self, *args, **kwargs)

        # From here on nothing may build an API client: kubernetes_asyncio's Watch builds one (and a TLS
        # context loading the CA certificates, 40 ms of the loop's CPU) for every watch it opens.
        monkeypatch.setattr(ApiClient, "__init__", counted)
        try:
            first, version = await kube.annotations()
            seen: list[dict[str, str]] = []

            async def watch() -> None:
                for _ in range(2):  # two watches, as the loop opens one per attempt and one between
                    async with contextlib.aclosing(kube.watch(version, 5)) as changes:
                        async for annotations in changes:
                            seen.append(annotations)
                            if c.ANN_REPORT in annotations:
                                break

            watching = asyncio.create_task(watch())
            await asyncio.sleep(0.3)
            await kube.report(c.AgentReport(attempt=1, state="verified"), c.PodTiming(verified=1.0))
            await asyncio.wait_for(watching, 15)
            errors = {}
            gone = PodClient("nobody", namespace)
            gone.core = kube.core
            for name, call in (
                ("read", gone.annotations()),
                ("report", gone.report(c.AgentReport(attempt=1, state="failed"))),
                ("watch", anext(aiter(kube.watch("not-a-version", 5)))),
            ):
                with pytest.raises(ApiException) as err:
                    await call
                errors[name] = err.value.status
            return first, seen, errors | {"containers": await kube.containers("seedfork-agent")}
        finally:
            await kube.close()

    first, seen, results = asyncio.run(scenario())
    assert c.Assignment.from_annotations(first).attempt == 1
    assert c.AgentReport.from_annotations(seen[0]).state == "verified"
    assert c.PodTiming.model_validate_json(seen[0][c.ANN_TIMING]).verified == 1.0
    assert results["read"] == 404 and results["report"] == 404
    assert results["watch"] and results["watch"] >= 400  # the apiserver refuses the version: raised, not skipped
    assert results["containers"] == {}  # no kubelet ran it: no container statuses
    assert built == [], "an API client was built after open()"
