"""Fixtures of the unit tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from seedfork_agent import podloop
from seedfork_agent.podrun import PodAgent
from seedfork_api.contract import PodEnv


class _NoKube:
    """The pod loop's Kubernetes client, never called here: no pod is read or patched."""

    def __init__(self, *_: object) -> None:
        pass


@pytest.fixture
def pod_agent(monkeypatch) -> Callable[..., PodAgent]:
    """Makes a pod's agent (``engine``, an engine ``hook``) whose Kubernetes client is never called; nccl: it
    serves no TransferEngine, so nothing here listens on a port."""
    monkeypatch.setattr(podloop, "PodClient", _NoKube)

    def make(engine: str = "reference", hook=None) -> PodAgent:
        env = PodEnv(pod_name="p-0", namespace="ns", set_name="s", token="t", fingerprint="fp", backend="nccl",
                     engine=engine)  # fmt: skip
        return PodAgent(env, "cpu", hook)

    return make
