"""The shared API: the generated CRD matches the committed one; fingerprints; the pod contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from seedfork_api import contract, crd
from seedfork_api import spec as api

REPO = Path(__file__).resolve().parents[2]


def test_committed_crd_is_generated_from_the_models():
    committed = (REPO / "crds" / "seedfork.io_modelreplicasets.yaml").read_text()
    assert committed == crd.render(), "run `python -m seedfork_api.crd` and commit the result"


def test_spec_schema_is_structural():
    """No $ref, anyOf or additionalProperties:false may reach the apiserver."""

    def walk(node):
        if isinstance(node, dict):
            assert "$ref" not in node and "anyOf" not in node and "title" not in node
            assert node.get("additionalProperties") is not False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(crd.spec_schema())
    walk(crd.status_schema())


def _spec(**engine) -> api.ModelReplicaSetSpec:
    return api.ModelReplicaSetSpec.model_validate(
        {"model": {"name": "m", "uri": "/w"}, "engine": {"kind": "reference", **engine}}
    )


def test_fingerprint_changes_with_identity_but_not_with_replicas():
    base = _spec()
    assert base.fingerprint() == _spec().fingerprint()
    assert len(base.fingerprint()) == 16
    more = base.model_copy(update={"replicas": 9})
    assert more.fingerprint() == base.fingerprint()
    assert _spec(version="0.5").fingerprint() != base.fingerprint()
    assert _spec(parallelism={"tp": 2}).fingerprint() != base.fingerprint()
    other_model = base.model_copy(update={"model": base.model.model_copy(update={"revision": "v2"})})
    assert other_model.fingerprint() != base.fingerprint()


def test_contract_round_trips_through_annotations():
    assign = contract.Assignment(
        attempt=2,
        source="seed",
        backend="nccl",
        seed_pod="p-0",
        seed_ip="127.0.0.5",
        seed_agent_port=18080,
        group_ports=[40000, 40001],
        cohort_id="c1",
        cohort_rank=1,
        cohort_size=3,
    )
    report = contract.AgentReport(attempt=2, state="verified", bytes_done=10, bytes_total=10)
    patch = contract.annotation_patch(assignment=assign, report=report)
    annotations = patch["metadata"]["annotations"]
    assert set(annotations) == {contract.ANN_ASSIGNMENT, contract.ANN_REPORT}
    assert contract.Assignment.from_annotations(annotations) == assign
    assert contract.AgentReport.from_annotations(annotations).state == "verified"
    assert '"seedIP":"127.0.0.5"' in annotations[contract.ANN_ASSIGNMENT]
    assert contract.Assignment.from_annotations({}) is None


def test_pod_env_requires_the_token_and_identity():
    env = {
        contract.ENV_POD_NAME: "p",
        contract.ENV_POD_NAMESPACE: "ns",
        contract.ENV_SET: "s",
        contract.ENV_TOKEN: "t",
        contract.ENV_PORT_RANGE: "41000-41009",
        contract.ENV_TP: "2",
    }
    parsed = contract.PodEnv.from_environ(env)
    assert parsed.port_range == (41000, 41009) and parsed.tp == 2 and parsed.token == "t"
    with pytest.raises(ValueError, match="SEEDFORK_TOKEN"):
        contract.PodEnv.from_environ({k: v for k, v in env.items() if k != contract.ENV_TOKEN})


def test_unknown_spec_fields_are_rejected_by_the_model():
    with pytest.raises(ValidationError):
        api.ModelReplicaSetSpec.model_validate({"model": {"name": "m"}, "engine": {"kind": "reference"}, "transfr": {}})


def _transfer(**fields) -> api.TransferSpec:
    return api.TransferSpec.model_validate(fields)


def test_transfer_policy_resolves_spec_then_cluster_default_then_builtin():
    cluster = _transfer(backend="nccl", retries=5, timeoutSeconds=60)
    got = api.resolve_transfer(_transfer(retries=1, agentPort=19000), cluster, "vllm")
    assert (got.backend, got.retries, got.timeout_seconds) == ("nccl", 1, 60)  # spec wins, then the cluster
    assert (got.agent_port, got.fallback, got.max_clients_per_seed) == (19000, "storage", 4)  # then built-in
    assert api.resolve_transfer(_transfer(), None, "vllm") == api.TransferSpec()
    # the storage fan-in limit is cluster policy too: the set's value, else the cluster's, else 2
    fan_in = api.resolve_transfer(_transfer(), _transfer(maxConcurrentStorageLoads=8), "vllm")
    assert fan_in.max_concurrent_storage_loads == 8 and api.TransferSpec().max_concurrent_storage_loads == 2
    own = api.resolve_transfer(_transfer(maxConcurrentStorageLoads=1), _transfer(maxConcurrentStorageLoads=8), "vllm")
    assert own.max_concurrent_storage_loads == 1
    # Only the policy fields come from the cluster: per-set ports never do.
    assert api.resolve_transfer(_transfer(), _transfer(agentPort=19999), "vllm").agent_port == 18080


def test_sglang_over_nccl_gets_one_client_per_seed_unless_the_spec_says_otherwise():
    cluster = _transfer(backend="nccl", maxClientsPerSeed=8)
    assert api.resolve_transfer(_transfer(), cluster, "sglang").max_clients_per_seed == 1
    assert api.resolve_transfer(_transfer(), cluster, "vllm").max_clients_per_seed == 8
    explicit = api.resolve_transfer(_transfer(maxClientsPerSeed=3), cluster, "sglang")
    assert explicit.max_clients_per_seed == 3
    spec = _spec().model_copy(update={"transfer": explicit, "engine": api.EngineSpec(kind="sglang")})
    assert "maxClientsPerSeed must be 1" in api.transfer_problem(spec)


def test_resolved_policy_problems_the_crd_cannot_see():
    sglang_pp2 = api.EngineSpec(kind="sglang", parallelism={"tp": 1, "pp": 2})
    for backend in ("auto", "transfer_engine"):  # auto resolves to TransferEngine, which SGLang keys by TP rank
        spec = _spec().model_copy(update={"engine": sglang_pp2, "transfer": _transfer(backend=backend)})
        assert "pp 1" in api.transfer_problem(spec)
    ok = _spec().model_copy(update={"engine": sglang_pp2, "transfer": _transfer(backend="nccl", maxClientsPerSeed=1)})
    assert api.transfer_problem(ok) is None
    assert api.transfer_problem(_spec()) is None
    ephemeral = _transfer(ports={"start": 40000, "end": 40099})
    for backend in ("auto", "transfer_engine"):  # the agent's TransferEngine would listen outside the set's range
        spec = _spec().model_copy(update={"transfer": ephemeral.model_copy(update={"backend": backend})})
        assert "move spec.transfer.ports below 32768" in api.transfer_problem(spec)
    nccl = _spec().model_copy(update={"transfer": ephemeral.model_copy(update={"backend": "nccl"})})
    assert api.transfer_problem(nccl) is None


def test_default_transfer_ports_stay_below_the_ephemeral_range():
    """A listener in 32768-60999 can collide with any outgoing connection's local port in the pod."""
    ports = api.PortRange()
    assert 1024 <= ports.start <= ports.end < 32768
    assert not ports.start <= api.TransferSpec().agent_port <= ports.end


def test_pod_env_defaults_are_the_specs():
    # A pod rendered without these variables runs with what the spec would have given it.
    env = {contract.ENV_POD_NAME: "p", contract.ENV_POD_NAMESPACE: "ns", contract.ENV_SET: "s", contract.ENV_TOKEN: "t"}
    parsed = contract.PodEnv.from_environ(env)
    transfer, engine = api.TransferSpec(), api.EngineSpec(kind="reference")
    assert parsed.agent_port == transfer.agent_port and parsed.engine_port == engine.port
    assert parsed.port_range == (transfer.ports.start, transfer.ports.end)
    assert (parsed.backend, parsed.protocol) == (transfer.backend, transfer.protocol)
    assert parsed.timeout_seconds == transfer.timeout_seconds
    assert parsed.max_clients_per_seed == transfer.max_clients_per_seed
    assert (parsed.tp, parsed.pp) == (engine.parallelism.tp, engine.parallelism.pp)


def test_pod_env_names_a_malformed_variable():
    env = {contract.ENV_POD_NAME: "p", contract.ENV_POD_NAMESPACE: "ns", contract.ENV_SET: "s", contract.ENV_TOKEN: "t"}
    with pytest.raises(ValueError, match=contract.ENV_AGENT_PORT):
        contract.PodEnv.from_environ({**env, contract.ENV_AGENT_PORT: "eighteen"})
    with pytest.raises(ValueError, match=contract.ENV_PORT_RANGE):
        contract.PodEnv.from_environ({**env, contract.ENV_PORT_RANGE: "28000"})


def test_engine_env_is_what_a_hook_needs():
    with pytest.raises(ValueError, match=f"{contract.ENV_POD_IP}, {contract.ENV_ENGINE_PORT}"):
        contract.EngineEnv.from_environ({contract.ENV_TOKEN: "t"})
    got = contract.EngineEnv.from_environ({contract.ENV_POD_IP: "127.0.0.9", contract.ENV_ENGINE_PORT: "30001"})
    assert (got.pod_ip, got.engine_port, got.token) == ("127.0.0.9", 30001, None)
    assert got.timeout_seconds == api.TransferSpec().timeout_seconds
    assert got.agent_port == api.TransferSpec().agent_port  # the agent's port, from the spec's default
    # A reader that needs other fields says which (the vLLM loader: the agent, not the engine's port).
    got = contract.EngineEnv.from_environ({contract.ENV_POD_IP: "127.0.0.9"}, required=("pod_ip",))
    assert got.engine_port == api.EngineSpec.model_fields["port"].default
    with pytest.raises(ValueError, match=contract.ENV_TOKEN):
        contract.EngineEnv.from_environ({contract.ENV_POD_IP: "127.0.0.9"}, required=("pod_ip", "token"))
