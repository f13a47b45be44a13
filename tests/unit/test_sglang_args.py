"""What seedfork refuses or renders for SGLang from the template alone (no SGLang needed here; the `sglang`
tier checks the option names against SGLang's parser)."""

from __future__ import annotations

import pytest

from seedfork_agent.engines import sglang
from seedfork_api.contract import PodEnv, sglang_own_ports
from seedfork_api.sglang_args import data_parallel_problem
from seedfork_api.spec import ModelReplicaSetSpec, transfer_problem
from seedfork_operator.planner import port_blocks
from seedfork_operator.render import TemplateError, check_template


def template(*args: str) -> dict:
    command = ["python3", "-m", "sglang.launch_server"]
    return {"spec": {"containers": [{"name": "engine", "command": command, "args": ["--model-path", "/m", *args]}]}}


@pytest.mark.parametrize(
    "args",
    [
        ("--dp-size", "2"),
        ("--dp", "2"),  # argparse's prefix: SGLang takes it as --dp-size
        ("--data-parallel-size=4",),
        ("--attn-dp-size", "2"),
        ("--attn-dp", "2"),
        ("--attention-data-parallel-size", "8"),
        ("--dp-size", "2", "--enable-dp-attention"),
    ],
)
def test_data_parallel_templates_are_refused_naming_the_flag(args):
    with pytest.raises(TemplateError, match=args[0].split("=")[0]) as e:
        check_template(template(*args), "sglang")
    assert "dp_size * attn_dp_size" in str(e.value)


@pytest.mark.parametrize("args", [(), ("--dp-size", "1"), ("--tp-size", "2"), ("--enable-dp-attention",)])
def test_single_rank_templates_pass(args):
    check_template(template(*args), "sglang")
    assert data_parallel_problem(["--model-path", "/m", *args]) is None


def test_other_engines_are_not_read_as_sglang():
    check_template(template("--dp-size", "2"), "vllm")


def test_agent_refuses_the_same_at_render():
    with pytest.raises(sglang.LayoutRefused, match="--attn-dp-size 2"):
        sglang.render(["python3", "-m", "sglang.launch_server", "--attn-dp-size", "2"], pod_ip="10.0.0.1",
                      engine_port=30000, bootstrap_port=28098, assignment=None)  # fmt: skip


def _env(protocol: str) -> PodEnv:
    return PodEnv(pod_name="p", namespace="n", pod_ip="10.0.0.1", set_name="s", fingerprint="f", agent_port=18080,
                  engine_port=30000, engine="sglang", backend="transfer_engine", protocol=protocol,
                  port_range=(28000, 28099), token="t")  # fmt: skip


@pytest.mark.parametrize(
    ("protocol", "env"),
    [
        ("tcp", {"MOONCAKE_PROTOCOL": "tcp", "MC_FORCE_TCP": "1"}),
        ("rdma", {"MOONCAKE_PROTOCOL": "rdma"}),
        ("nvlink_intra", {"MOONCAKE_PROTOCOL": "nvlink_intra", "MC_INTRANODE_NVLINK": "1"}),
        ("auto", {}),
    ],
)
def test_protocol_reaches_sglangs_transfer_engine(protocol, env):
    launch = sglang.render_for_pod(["python3", "-m", "sglang.launch_server"], _env(protocol), None)
    mooncake = {k: v for k, v in launch.env.items() if k.startswith(("MOONCAKE_", "MC_"))}
    assert mooncake == env


def test_pods_render_dist_init_addr_and_bootstrap_in_the_sets_range():
    launch = sglang.render_for_pod(["python3", "-m", "sglang.launch_server"], _env("auto"), None)
    argv = launch.argv
    assert argv[argv.index("--dist-init-addr") + 1] == "10.0.0.1:28099"
    assert argv[argv.index("--engine-info-bootstrap-port") + 1] == "28098"
    assert sglang_own_ports((28000, 28099)) == (28099, 28098)


def _spec(**transfer) -> ModelReplicaSetSpec:
    transfer = {"backend": "nccl", "maxClientsPerSeed": 1, **transfer}
    engine = {"kind": "sglang", "parallelism": {"tp": 2}}
    return ModelReplicaSetSpec.model_validate({"model": {"name": "m"}, "engine": engine, "transfer": transfer})


def test_group_ports_leave_sglangs_own_ports_free():
    spec = _spec(ports={"start": 28000, "end": 28009})
    handed_out = {p for block in port_blocks(spec) for p in block}
    assert handed_out and handed_out.isdisjoint(sglang_own_ports((28000, 28009)))
    assert max(handed_out) == 28007


def test_a_range_without_room_for_sglangs_own_ports_is_a_problem():
    assert "plus 2" in transfer_problem(_spec(ports={"start": 28000, "end": 28002}))
    assert transfer_problem(_spec(ports={"start": 28000, "end": 28003})) is None
