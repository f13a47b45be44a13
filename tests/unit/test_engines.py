"""The engine table is the one home of what each engine can do: changing a row changes admission (the CEL
rules), the resolved-policy check, the planner, pod rendering and the agent alike. Each test swaps rows, so a
rule that still names an engine instead of reading its row fails here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from seedfork_agent.engines import sglang as sglang_agent
from seedfork_api import contract, engines
from seedfork_api import spec as api
from seedfork_operator import planner, render
from seedfork_operator.podview import PodView

ENGINE_LIMITS = ("te_max_pp", "nccl_max_clients", "te_clients_seed", "standby")
REPO = Path(__file__).resolve().parents[2]
SEEDED = contract.Assignment(attempt=1, source="seed", seed_pod="s", seed_ip="10.0.0.1", backend="transfer_engine")


@pytest.fixture
def swapped(monkeypatch):
    """vLLM gets SGLang's limits and SGLang vLLM's: an SGLang release that lifts them, a vLLM that adds them."""
    sglang, vllm = engines.ENGINES["sglang"], engines.ENGINES["vllm"]
    monkeypatch.setitem(engines.ENGINES, "vllm", replace(vllm, **{k: getattr(sglang, k) for k in ENGINE_LIMITS}))
    monkeypatch.setitem(engines.ENGINES, "sglang", replace(sglang, **{k: getattr(vllm, k) for k in ENGINE_LIMITS}))


def _spec(kind: str, **transfer) -> api.ModelReplicaSetSpec:
    return api.ModelReplicaSetSpec.model_validate(
        {"model": {"name": "m", "uri": "/w"}, "engine": {"kind": kind, "parallelism": {"pp": 2}}, "transfer": transfer}
    )


def _messages() -> str:
    return "\n".join(rule["message"] for rule in api.spec_rules())


def test_the_committed_rules_are_the_tables():
    assert api.spec_rules() == api.SPEC_RULES
    assert set(api.EngineKind.__args__) == set(engines.ENGINES)


def test_a_lifted_limit_leaves_admission_and_the_policy_check_together(swapped):
    messages = _messages()
    assert "pp must be 1 for engine vllm with backend transfer_engine" in messages
    assert "maxClientsPerSeed must be 1 for engine vllm with backend nccl" in messages
    assert "engine sglang with backend" not in messages
    assert "spec.standby must be 0 for engine vllm: standby replicas are built for engine reference and sglang" in (
        messages
    )
    rules = "\n".join(rule["rule"] for rule in api.spec_rules())
    assert "self.engine.kind == 'vllm'" in rules and "self.engine.kind == 'sglang'" not in rules

    assert "pp 1" in api.transfer_problem(_spec("vllm", backend="transfer_engine"))
    assert api.transfer_problem(_spec("sglang", backend="transfer_engine")) is None
    assert "maxClientsPerSeed must be 1" in api.transfer_problem(_spec("vllm", backend="nccl", maxClientsPerSeed=3))
    assert api.transfer_problem(_spec("sglang", backend="nccl", maxClientsPerSeed=3)) is None


def test_a_lifted_limit_reaches_the_resolved_policy_and_the_planner(swapped):
    cluster = api.TransferSpec.model_validate({"backend": "nccl", "maxClientsPerSeed": 8})
    assert api.resolve_transfer(api.TransferSpec(), cluster, "vllm").max_clients_per_seed == 1
    assert api.resolve_transfer(api.TransferSpec(), cluster, "sglang").max_clients_per_seed == 8

    vllm_nccl, sglang_nccl = _spec("vllm", backend="nccl", maxClientsPerSeed=4), _spec("sglang", backend="nccl")
    assert planner.client_limit(vllm_nccl) == 1 and planner.client_limit(sglang_nccl) == 4
    # cohorts belong to who moves the bytes (the agent for vLLM), not to the swapped limits
    assert planner.uses_cohorts(vllm_nccl) and not planner.uses_cohorts(sglang_nccl)

    report = contract.AgentReport(attempt=1, state="verified", serving=True)
    te_loaded = PodView(name="p", ready=True, ip="10.0.0.2", fingerprint="fp", assignment=SEEDED, report=report)
    assert not planner.can_seed(_spec("vllm", backend="transfer_engine"), "fp", te_loaded)
    assert planner.can_seed(_spec("sglang", backend="transfer_engine"), "fp", te_loaded)


def test_a_lifted_limit_reaches_the_agents_sglang_launch(swapped):
    sglang_agent.check_layout(sglang_agent.Layout(pp=1), "transfer_engine")
    launch = sglang_agent.render(
        ["python3", "-m", "sglang.launch_server"],
        pod_ip="10.0.0.3",
        engine_port=30000,
        bootstrap_port=28098,
        assignment=SEEDED,
    )
    assert launch.can_seed  # SGLang's row now lets TransferEngine-loaded pods seed


def test_auto_is_what_the_row_says_everywhere(monkeypatch):
    monkeypatch.setitem(engines.ENGINES, "vllm", replace(engines.ENGINES["vllm"], auto_backend="nccl"))
    auto = _spec("vllm", backend="auto")
    assert planner.resolve_backend(auto) == "nccl" and planner.uses_cohorts(auto)
    assert planner.resolve_backend(_spec("reference", backend="auto")) == "transfer_engine"
    ephemeral = _spec("vllm", backend="auto", ports={"start": 40000, "end": 40099})
    assert api.transfer_problem(ephemeral) is None  # no TransferEngine listens: nccl
    env = {e["name"]: e.get("value") for e in render.contract_env(auto, "s", "fp", "secret")}
    assert env[contract.ENV_BACKEND] == "nccl"


def test_the_agent_role_shapes_the_template_check(monkeypatch):
    no_command = {"spec": {"containers": [{"name": "engine", "image": "i"}]}}
    render.check_template(no_command, "reference")
    monkeypatch.setitem(engines.ENGINES, "reference", replace(engines.ENGINES["reference"], agent="entry_point"))
    with pytest.raises(render.TemplateError, match=r"engine reference: .* needs an explicit command"):
        render.check_template(no_command, "reference")


def test_the_standby_refusal_names_the_field_and_points_at_a_section_that_exists():
    """SGLang's refusal says where its standby is designed; the link must land on a heading of that doc."""
    rule = next(r for r in api.spec_rules() if r.get("fieldPath") == ".standby")
    design = engines.of("sglang").standby_design
    assert rule["message"].startswith("spec.standby must be 0 for engine sglang")
    assert f"for sglang see {design}" in rule["message"]
    doc, anchor = design.split("#")
    headings = [line.lstrip("#").strip() for line in (REPO / doc).read_text().splitlines() if line.startswith("## ")]
    slugs = {"".join(c for c in h.lower() if c.isalnum() or c in " -").replace(" ", "-") for h in headings}
    assert anchor in slugs
