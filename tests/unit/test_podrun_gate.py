"""Which pod agents wait for their engine's proof (``engines.gate``) before reporting verified."""

from __future__ import annotations

import pytest

from seedfork_agent import podloop
from seedfork_agent.podrun import PodAgent
from seedfork_api.contract import PodEnv


class _NoKube:
    """The pod loop's Kubernetes client, never called here."""

    def __init__(self, *_: object) -> None:
        pass


def _pod(monkeypatch, engine: str, hook=None) -> PodAgent:
    monkeypatch.setattr(podloop, "PodClient", _NoKube)
    env = PodEnv(pod_name="p-0", namespace="ns", set_name="s", token="t", fingerprint="fp", backend="nccl",
                 engine=engine)  # fmt: skip
    return PodAgent(env, "cpu", hook)


@pytest.mark.parametrize(("engine", "layout"), [("reference", False), ("vllm", True)])
def test_an_attaching_engine_proves_its_load(monkeypatch, engine, layout):
    gate = _pod(monkeypatch, engine).agent.gate
    assert gate is not None and gate.engine_layout is layout and gate.ranks == 1


def test_an_engine_fed_by_a_hook_has_no_gate(monkeypatch):
    # The hook returns only once the engine took the weights; a gate would wait for a report that never comes.
    assert _pod(monkeypatch, "reference", hook=lambda store, info: None).agent.gate is None
