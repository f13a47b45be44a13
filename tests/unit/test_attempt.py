"""The agent's attempt state has one home: the pod report, /v1/progress and /readyz all say what it says."""

from __future__ import annotations

import json

import pytest

from seedfork_agent.attempt import AttemptState
from seedfork_agent.podrun import PodAgent
from seedfork_agent.store import WeightStore, layout
from seedfork_api.contract import AgentReport

# What /v1/progress has always answered: clients (the vLLM loader and guard, tests, benchmarks) read these.
PROGRESS_KEYS = {
    "state", "attempt", "source", "backend", "seed", "bytesDone", "bytesTotal", "error", "serving", "activeClients",
    "timing",
}  # fmt: skip


@pytest.fixture
def pod(pod_agent):
    pod = pod_agent()
    pod.agent.gate = None  # no engine runs here to prove the load (that is tests/agent/test_reference_proof.py)
    changes: list[AgentReport] = []
    pod.notify = lambda: changes.append(pod.agent.attempt.report)  # the one change callback: count its calls
    pod.agent.attempt.on_change = pod.notify
    yield pod, changes
    pod.agent.release()


def _store() -> WeightStore:
    store = WeightStore.empty(layout([("w", "float32", (16,)), ("b", "float32", (4,))], "fp"))
    store.manifest = store.manifest.with_checksums(store.compute_checksums())
    return store


async def _views(pod: PodAgent) -> tuple[dict, int]:
    """What the agent's HTTP server answers on /v1/progress and /readyz (its handlers read no request)."""
    server = pod.agent.server
    progress = json.loads((await server.progress_view(None)).body)
    return progress, (await server.readyz(None)).status


def _same(progress: dict, report: AgentReport) -> None:
    """/v1/progress and the pod report say the same about the attempt (by the contract's names)."""
    published = report.model_dump(by_alias=True)
    assert set(progress) == PROGRESS_KEYS
    for key in PROGRESS_KEYS - {"seed", "timing"}:
        assert progress[key] == published[key], key


async def test_a_verified_attempt_reads_the_same_everywhere(pod):
    pod, changes = pod
    store = _store()
    assert await pod.agent.adopt(store)
    attempt = pod.agent.attempt
    report, (progress, ready) = pod.report(), await _views(pod)
    _same(progress, report)
    assert report.state == "verified" and report.serving and ready == 200
    assert report.bytes_done == report.bytes_total == store.manifest.payload_bytes
    assert report.digest == store.manifest.digest and report.fingerprint == "fp" and report.attempt == 1
    assert [c.state for c in changes] == ["transferring", "verified"]  # one call per change of state
    # The phases /v1/progress shows are the ones the pod's timing annotation gets, by the same names.
    timing = pod.current_timing()
    assert timing.bytes == report.bytes_total and timing.started is not None
    assert timing.verified >= timing.transfer_start == attempt.timing.transfer_start
    assert progress["timing"] == attempt.timing.model_dump(by_alias=True, exclude_unset=True)
    assert progress["timing"]["verified"] == timing.verified


async def test_a_self_check_holds_the_seed_back_in_the_report_and_its_failure_reaches_every_view(pod):
    pod, _ = pod
    assert await pod.agent.adopt(_store())
    attempt = pod.agent.attempt
    attempt.check_started()
    # While it re-checks, the operator must pick no new client for it; the server still serves its clients.
    assert not pod.report().serving and pod.agent.serving and (await _views(pod))[1] == 200
    attempt.check_ended("self-check failed: 1 of 2 tensors differ")
    report, (progress, ready) = pod.report(), await _views(pod)
    _same(progress, report)
    assert report.state == "failed" and not report.serving and report.self_checks == 1 and ready == 503
    assert report.error.startswith("self-check failed") and not pod.agent.serving and pod.done() is False
    assert report.digest is not None  # the operator sees which weights failed


async def test_clients_and_refused_attempts_reach_the_report_and_progress(pod):
    pod, changes = pod
    attempt = pod.agent.attempt
    attempt.clients(+2)
    _same((await _views(pod))[0], pod.report())
    assert pod.report().active_clients == 2
    attempt.clients(-2)
    attempt.refused(3, "seed", "assigned a seed without its IP", "seed-0")
    report, (progress, ready) = pod.report(), await _views(pod)
    _same(progress, report)
    assert (report.attempt, report.state, report.seed_pod, report.error) == (
        3, "failed", "seed-0", "assigned a seed without its IP",
    )  # fmt: skip
    assert ready == 503 and len(changes) == 3
    assert pod.current_timing() is not None and pod.current_timing().transfer_start is None  # nothing moved


def test_a_standby_waits_pending_then_warm_and_names_no_seed():
    seen: list[str] = []
    state = AttemptState("fp")
    state.on_change = lambda: seen.append(state.state)
    state.refused(1, "storage", "x")
    state.standby(2)
    assert state.report.error is None and state.report.source == "standby" and state.report.seed_pod is None
    state.warm()
    assert seen == ["failed", "pending", "standby"]


def test_bytes_and_phases_do_not_call_the_change_callback_and_a_wrong_phase_name_raises():
    calls: list[int] = []
    state = AttemptState("fp", lambda: calls.append(1))
    state.begin(1, "seed", "transfer_engine", "10.0.0.1:18080", "seed-0")
    state.moved(10, 100)
    state.mark(transfer_end=1.0)
    assert calls == [1] and state.report.bytes_done == 10 and state.progress()["seed"] == "10.0.0.1:18080"
    state.mark(engine_ready=2.0, publish=True)  # a phase after the final state must still be published
    assert calls == [1, 1]
    with pytest.raises(ValueError):
        state.mark(transfer_ends=1.0)
    storage = AttemptState()
    storage.begin(1, "storage", seed_pod="seed-0")
    assert storage.report.seed_pod is None  # a pod is named only for an attempt from a seed
