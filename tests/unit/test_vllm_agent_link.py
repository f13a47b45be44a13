"""The vLLM loader finds its pod's agent through the pod contract (``EngineEnv``), defaults from the spec."""

from __future__ import annotations

import pytest

from seedfork_agent.engines.vllm_loader import AgentLink, LoadRefused
from seedfork_api import contract, spec

POD = {contract.ENV_POD_IP: "10.0.0.7", contract.ENV_AGENT_PORT: "18099", contract.ENV_TOKEN: "t"}


def test_the_link_reads_the_contract_with_the_spec_defaults():
    link = AgentLink.from_environ(POD)
    assert link.url == "http://10.0.0.7:18099" and link.timeout_s == spec.TransferSpec().timeout_seconds
    assert link._headers == {"Authorization": "Bearer t"}
    link = AgentLink.from_environ({**POD, contract.ENV_TIMEOUT_SECONDS: "12.5"})
    assert link.timeout_s == 12.5


@pytest.mark.parametrize("absent", list(POD))
def test_outside_a_seedfork_pod_the_load_is_refused_naming_what_is_missing(absent):
    with pytest.raises(LoadRefused, match=absent):
        AgentLink.from_environ({**POD, absent: ""})


def test_a_malformed_agent_port_is_refused_naming_it():
    with pytest.raises(LoadRefused, match=contract.ENV_AGENT_PORT):
        AgentLink.from_environ({**POD, contract.ENV_AGENT_PORT: "eighteen"})
