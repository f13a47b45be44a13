"""Which pod agents wait for their engine's proof (``engines.gate``) before reporting verified."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(("engine", "layout"), [("reference", False), ("vllm", True)])
def test_an_attaching_engine_proves_its_load(pod_agent, engine, layout):
    gate = pod_agent(engine).agent.gate
    assert gate is not None and gate.engine_layout is layout and gate.ranks == 1


def test_an_engine_fed_by_a_hook_has_no_gate(pod_agent):
    # The hook returns only once the engine took the weights; a gate would wait for a report that never comes.
    assert pod_agent("reference", hook=lambda store, info: None).agent.gate is None
