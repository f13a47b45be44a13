"""The SGLang adapter against SGLang's own code (the version of tests/sglang/requirements.txt), on a CPU.

Every command line the agent renders goes through SGLang's parser and resolution; the TransferEngine seed's
bootstrap server and its TP workers' registration run as the agent launches them; the fallback check reads
SGLang's real resolved arguments and log line. Two substitutions only, both named where they happen: the
model path points at a small local Llama config (conftest's ``model_dir``: resolution reads the model's
config.json), and
``--device cpu`` is added (resolution needs a device, and this machine has no GPU).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from seedfork_agent.engines import sglang
from seedfork_api.contract import Assignment, PodEnv, sglang_own_ports
from seedfork_api.spec import ModelReplicaSetSpec, resolve_transfer
from seedfork_operator.planner import port_blocks, resolve_backend

pytestmark = pytest.mark.sglang

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(ROOT.glob("examples/sglang-*.yaml"))
POD_IP, SEED_IP = "127.0.0.1", "127.0.0.1"


def pod_env(tp: int = 1, backend: str = "transfer_engine", ports=(28000, 28099), **kw) -> PodEnv:
    values = dict(
        pod_name="p", namespace="n", pod_ip=POD_IP, set_name="s", fingerprint="f", agent_port=18080,
        engine_port=30000, engine="sglang", backend=backend, port_range=ports, tp=tp, token="t",
    )  # fmt: skip
    return PodEnv(**(values | kw))


def seed_assignment(backend: str, group_ports=()) -> Assignment:
    return Assignment(attempt=1, source="seed", backend=backend, seed_ip=SEED_IP, group_ports=list(group_ports))


def sglang_args(argv: list[str], model_dir: Path) -> list[str]:
    """The arguments after ``-m sglang.launch_server``, with the two substitutions of this module's docstring."""
    args = list(argv[argv.index("sglang.launch_server") + 1 :])
    if "--model-path" in args:
        args[args.index("--model-path") + 1] = str(model_dir)
    else:
        args += ["--model-path", str(model_dir)]
    return [*args, "--device", "cpu"]


def base(tp: int) -> list[str]:
    return ["python3", "-m", "sglang.launch_server", "--model-path", "/models/llama", "--tp-size", str(tp)]


def launches() -> dict[str, sglang.Launch]:
    """Every launch the agent renders: seed and client, both backends, tp 1 and 2, and each example."""
    out = {}
    for tp in (1, 2):
        for backend in ("transfer_engine", "nccl"):
            env = pod_env(tp, backend)
            out[f"seed-{backend}-tp{tp}"] = sglang.render_for_pod(base(tp), env, None)
            ports = [28000 + i for i in range(tp)] if backend == "nccl" else []
            out[f"client-{backend}-tp{tp}"] = sglang.render_for_pod(base(tp), env, seed_assignment(backend, ports))
    for path in EXAMPLES:
        spec = ModelReplicaSetSpec.model_validate(yaml.safe_load(path.read_text())["spec"])
        spec.transfer = resolve_transfer(spec.transfer, None, spec.engine.kind)
        container = spec.template["spec"]["containers"][0]
        argv = [*container["command"], *container.get("args", [])]
        t, par = spec.transfer, spec.engine.parallelism
        backend = resolve_backend(spec)
        env = pod_env(
            par.tp, backend, (t.ports.start, t.ports.end), engine_port=spec.engine.port, protocol=t.protocol,
            pp=par.pp,
        )  # fmt: skip
        out[f"{path.stem}-storage"] = sglang.render_for_pod(argv, env, None)
        ports = port_blocks(spec)[0] if backend == "nccl" else []
        out[f"{path.stem}-seeded"] = sglang.render_for_pod(argv, env, seed_assignment(backend, ports))
    return out


LAUNCHES = launches()


@pytest.fixture(scope="module")
def resolved(tier, model_dir) -> dict[str, dict]:
    """SGLang's answer for every launch, in one run of its code (importing SGLang takes a while)."""
    names = list(LAUNCHES)
    answer = tier.run("resolve", {"argvs": [sglang_args(LAUNCHES[n].argv, model_dir) for n in names]})
    return dict(zip(names, answer["results"], strict=True))


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_sglang_parses_and_resolves_every_rendered_command(tier, resolved, name):
    """An unknown flag fails here; so does any silent fallback (resolution switching to disk, TE seed off)."""
    got = resolved[name]
    assert got["ok"], f"SGLang {tier.version()} refused the agent's {name} command: {got['error']}"
    launch = LAUNCHES[name]
    assert sglang.fallback_problems(launch.expected, got["resolved"]) == []
    if launch.role == "client":
        assert got["resolved"]["load_format"] == "remote_instance"
    if launch.role == "seed" and launch.backend == "transfer_engine":
        assert got["resolved"]["remote_instance_weight_loader_start_seed_via_transfer_engine"] is True


def test_the_examples_are_covered():
    assert {p.stem for p in EXAMPLES} >= {"sglang-nccl", "sglang-transfer-engine"}


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_fallback_check_reads_sglangs_log_line(resolved, name):
    """When /server_info cannot be read, the log line SGLang's Engine writes is enough to see the same."""
    got = resolved[name]
    assert got["ok"], got["error"]
    from_log = sglang.resolved_args_from_log("[2026-12-01 09:00:00] some line\n" + got["log_line"] + "\n")
    assert sglang.fallback_problems(LAUNCHES[name].expected, from_log) == []


def test_fallback_check_catches_sglangs_own_fallbacks(tier, model_dir, tmp_path):
    """Resolution turns the TE seed flag off for --enable-memory-saver and the TE client to disk without
    Mooncake: the detector must catch both from SGLang's real resolved args and log line."""
    seed = sglang.render_for_pod(base(1), pod_env(), None)
    client = sglang.render_for_pod(base(1), pod_env(), seed_assignment("transfer_engine"))
    no_mooncake = tmp_path / "shadow" / "mooncake"
    no_mooncake.mkdir(parents=True)
    (no_mooncake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'mooncake'\")\n")
    saver = tier.run("resolve", {"argvs": [[*sglang_args(seed.argv, model_dir), "--enable-memory-saver"]]})
    hidden = tier.run(
        "resolve",
        {"argvs": [sglang_args(seed.argv, model_dir), sglang_args(client.argv, model_dir)]},
        env={"PYTHONPATH": str(no_mooncake.parent)},
    )
    cases = [(seed, saver["results"][0]), (seed, hidden["results"][0]), (client, hidden["results"][1])]
    for launch, got in cases:
        assert got["ok"], got["error"]
        for resolved_args in (got["resolved"], sglang.resolved_args_from_log(got["log_line"])):
            problems = sglang.fallback_problems(launch.expected, resolved_args)
            assert problems, f"a fallback went unseen: {got['log_line'][:300]}"
    assert "loading from disk" in sglang.fallback_problems(client.expected, hidden["results"][1]["resolved"])[0]
    assert "TransferEngine seed flag off" in sglang.fallback_problems(seed.expected, saver["results"][0]["resolved"])[0]


@pytest.mark.parametrize("tp", [1, 2])
def test_te_seed_serves_transfer_engine_info_for_every_rank(tier, model_dir, tp):
    """SGLang's bootstrap server (bound to --host) and each TP worker's registration, launched as rendered:
    the info every client rank asks for is served. Without --dist-init-addr the workers register at
    127.0.0.1, where nothing listens unless the pod IP is that address."""
    env = pod_env(tp, pod_ip="127.0.0.3", ports=(29100, 29199), protocol="tcp")
    launch = sglang.render_for_pod(base(tp), env, None)
    answer = tier.run("bootstrap", {"argv": sglang_args(launch.argv, model_dir), "tp": tp}, env=launch.env)
    assert answer["server_started"], answer
    _, bootstrap = sglang_own_ports(env.port_range)
    assert answer["bootstrap_url"] == f"http://127.0.0.3:{bootstrap}"
    for rank, served in enumerate(answer["served"]):
        assert served["status"] == 200, f"rank {rank}: {served}\n{answer['log']}"
        session, weights = served["body"]["remote_instance_transfer_engine_info"]
        assert session.startswith("127.0.0.3:")  # SGLANG_HOST_IP: the address clients read from
        assert set(weights) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_own_ports_stay_out_of_the_group_port_blocks():
    spec = ModelReplicaSetSpec.model_validate(yaml.safe_load((ROOT / "examples/sglang-nccl.yaml").read_text())["spec"])
    own = set(sglang_own_ports((spec.transfer.ports.start, spec.transfer.ports.end)))
    assert own.isdisjoint(p for block in port_blocks(spec) for p in block)


def test_log_parser_reads_a_dict_line_literally():
    line = "[2026-12-01] server_args={'load_format': 'auto', 'tp_size': 2, 'ports': [1, 2], 'host': '10.0.0.1'}"
    assert sglang.resolved_args_from_log(line) == ast.literal_eval(line.split("server_args=", 1)[1])
