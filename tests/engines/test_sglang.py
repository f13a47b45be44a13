"""The SGLang adapter: rendered commands against docs/sglang.md's flag table, refusals, and supervision.

SGLang cannot run here (no GPU), so supervision is tested against ``sglang_double.py``, a double of
SGLang's HTTP surface and flag handling built from docs/sglang.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest

from seedfork_agent.engines import sglang
from seedfork_api.contract import Assignment

DOUBLE = Path(__file__).with_name("sglang_double.py")
BASE = ["python", "-m", "sglang.launch_server", "--model-path", "/models/llama", "--tp-size", "2"]
IP = "10.1.2.3"


def seed_assignment(backend: str, ports=(41000, 41001), **kw) -> Assignment:
    return Assignment(attempt=1, source="seed", backend=backend, seed_ip="10.9.9.9", group_ports=list(ports), **kw)


def tail(argv: list[str]) -> list[str]:
    return argv[len(BASE) :]


def test_nccl_client_flags_match_the_table():
    launch = sglang.render(
        BASE, pod_ip=IP, engine_port=30000, bootstrap_port=40007, assignment=seed_assignment("nccl"), tp=2
    )
    assert tail(launch.argv) == [
        "--host", IP, "--port", "30000",
        "--engine-info-bootstrap-port", "40007",
        "--load-format", "remote_instance",
        "--remote-instance-weight-loader-backend", "nccl",
        "--remote-instance-weight-loader-seed-instance-ip", "10.9.9.9",
        "--remote-instance-weight-loader-seed-instance-service-port", "30000",
        "--remote-instance-weight-loader-send-weights-group-ports", "[41000,41001]",
    ]  # fmt: skip
    assert launch.env == {"SGLANG_HOST_IP": IP, "NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"}
    assert launch.role == "client" and launch.can_seed  # NCCL seeding needs no flag
    assert json.loads(launch.argv[-1]) == [41000, 41001]


def test_te_client_has_no_group_ports_and_cannot_seed():
    launch = sglang.render(
        BASE,
        pod_ip=IP,
        engine_port=31000,
        bootstrap_port=40001,
        assignment=seed_assignment("transfer_engine", ports=()),
        protocol="rdma",
    )
    t = tail(launch.argv)
    assert "--remote-instance-weight-loader-send-weights-group-ports" not in t
    assert t[t.index("--remote-instance-weight-loader-backend") + 1] == "transfer_engine"
    assert t[t.index("--remote-instance-weight-loader-seed-instance-service-port") + 1] == "31000"
    assert "--remote-instance-weight-loader-start-seed-via-transfer-engine" not in t
    assert launch.env["MOONCAKE_PROTOCOL"] == "rdma"
    assert not launch.can_seed  # sglang 0.5.23: a TE-loaded instance does not publish TE info


@pytest.mark.parametrize(("backend", "te_flag"), [("transfer_engine", True), ("auto", True), ("nccl", False)])
def test_storage_pods_start_as_seeds(backend, te_flag):
    launch = sglang.render(
        BASE, pod_ip=IP, engine_port=30000, bootstrap_port=40002, assignment=None, seed_backend=backend
    )
    t = tail(launch.argv)
    assert "--load-format" not in t  # loads from disk
    assert ("--remote-instance-weight-loader-start-seed-via-transfer-engine" in t) is te_flag
    assert t[t.index("--engine-info-bootstrap-port") + 1] == "40002"
    assert launch.role == "seed" and launch.env["SGLANG_HOST_IP"] == IP


@pytest.mark.parametrize(
    ("base", "assignment", "kw", "match"),
    [
        ([*BASE, "--dp-size", "2"], seed_assignment("nccl"), {}, "data parallel"),
        ([*BASE, "--pp-size", "2"], seed_assignment("transfer_engine"), {}, "TP rank only"),
        ([*BASE, "--pp-size", "2"], None, {}, "TP rank only"),
        ([*BASE, "--pp-size", "2"], seed_assignment("nccl"), {}, "pipeline"),
        (BASE, seed_assignment("nccl", ports=(41000,)), {}, "one group port per TP rank"),
        (BASE, Assignment(attempt=1, source="seed", backend="nccl", group_ports=[1, 2]), {}, "seed IP"),
        ([*BASE, "--load-format", "auto"], None, {}, "owns"),
        ([*BASE, "--enable-memory-saver"], None, {}, "memory-saver"),
        (BASE, None, {"tp": 4}, "pod contract"),
        ([*BASE, "--port", "1234"], None, {}, "binds"),
    ],
)
def test_refused_layouts(base, assignment, kw, match):
    with pytest.raises(sglang.LayoutRefused, match=match):
        sglang.render(base, pod_ip=IP, engine_port=30000, bootstrap_port=40000, assignment=assignment, **kw)


def test_rendered_commands_parse_with_the_documented_types():
    """The double's argparse is the flag table; every rendered command must parse with it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sglang_double", DOUBLE)
    double = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(double)
    client = sglang.render(BASE, pod_ip=IP, engine_port=30000, bootstrap_port=40007, assignment=seed_assignment("nccl"))
    args = double.parse(client.argv[3:])
    assert args.load_format == "remote_instance"
    assert args.remote_instance_weight_loader_send_weights_group_ports == [41000, 41001]
    assert args.remote_instance_weight_loader_seed_instance_service_port == 30000
    assert args.engine_info_bootstrap_port == 40007
    assert sglang.fallback_problems(client.expected, vars(double.resolve(args))) == []


def test_fallback_problems_name_the_silent_fallback():
    expected = {"load_format": "remote_instance", "remote_instance_weight_loader_send_weights_group_ports": [1, 2]}
    problems = sglang.fallback_problems(
        expected, {"load_format": "auto", "remote_instance_weight_loader_send_weights_group_ports": None}
    )
    assert "fell back to loading from disk" in problems[0] and len(problems) == 3
    te = sglang.fallback_problems({sglang.TE_SEED: True}, {sglang.TE_SEED: False})
    assert "TransferEngine validation failed" in te[0]


def test_resolved_args_from_log_reads_the_last_server_args_dict():
    """SGLang 0.5.23 logs ``server_args={resolved dict}``; a ``ServerArgs(...)`` repr (raw inputs) is ignored."""
    log = (
        "[2026-12-01 09:00:00] server_args={'model_path': '/m', 'load_format': 'remote_instance', 'tp_size': 2}\n"
        "WARNING falling back\n"
        "[2026-12-01 09:00:01] server_args={'model_path': '/m, x', 'load_format': 'auto', 'tp_size': 2, "
        "'remote_instance_weight_loader_send_weights_group_ports': [1, 2], 'enable_memory_saver': False}\n"
        "ServerArgs(model_path='/m', load_format='remote_instance', tp_size=2)\n"
    )
    got = sglang.resolved_args_from_log(log)
    assert got["load_format"] == "auto" and got["model_path"] == "/m, x" and got["tp_size"] == 2
    assert got["remote_instance_weight_loader_send_weights_group_ports"] == [1, 2]
    assert got["enable_memory_saver"] is False
    # A value that is no Python literal (an object's repr) costs only that value, not the line.
    odd = "server_args={'load_format': 'auto', 'quant': <Q at 0x1>, 'tp_size': 2}"
    assert sglang.resolved_args_from_log(odd) == {"load_format": "auto", "quant": "<Q at 0x1>", "tp_size": 2}


# ---- supervision against the double (real processes) --------------------------------------------


def double_base(model: Path, tp: int = 1) -> list[str]:
    return [sys.executable, str(DOUBLE), "--model-path", str(model), "--tp-size", str(tp), "--api-key", "k"]


async def start(h, model, tmp_path, name, *, assignment=None, seed_backend="transfer_engine", env=None, mutate=None):
    ip = h.loopback_ip()
    port = h.free_port(ip)
    launch = sglang.render(
        double_base(model, 2), pod_ip=ip, engine_port=port, bootstrap_port=h.free_port(ip),
        assignment=assignment, seed_backend=seed_backend, tp=2,
    )  # fmt: skip
    if mutate:
        launch = mutate(launch)
    seed_url = f"http://{assignment.seed_ip}:{port}" if assignment else None
    proc, outcome = await sglang.launch_and_supervise(
        launch, f"http://{ip}:{port}", seed_url, str(tmp_path / f"{name}.log"), timeout_s=60,
        base_env={**os.environ, **(env or {})},
    )  # fmt: skip
    return ip, port, proc, outcome


async def stop(*procs):
    for p in procs:
        if p.returncode is None:
            p.terminate()
            await asyncio.wait_for(p.wait(), 10)


async def test_seed_then_clients_verified_or_caught(tiny_model, tmp_path, h):
    seed_ip, port, seed, out = await start(h, tiny_model, tmp_path, "seed")
    procs = [seed]
    try:
        assert out.state == "verified" and out.can_seed, out.error
        assert out.resolved[sglang.TE_SEED] is True

        # Clients must use the seed's engine port: every pod of a set serves on the same port, here
        # each on its own loopback IP, so the port is reused.
        async def client(name, backend, **kw):
            ip = h.loopback_ip()
            assignment = Assignment(
                attempt=1, source="seed", backend=backend, seed_ip=seed_ip, group_ports=[41000, 41001]
            )
            launch = sglang.render(
                double_base(tiny_model, 2), pod_ip=ip, engine_port=port, bootstrap_port=h.free_port(ip),
                assignment=assignment, tp=2,
            )  # fmt: skip
            if kw.get("mutate"):
                launch = kw["mutate"](launch)
            env = {**os.environ, **kw.get("env", {})}
            p, o = await sglang.launch_and_supervise(
                launch, f"http://{ip}:{port}", f"http://{seed_ip}:{port}", str(tmp_path / f"{name}.log"),
                timeout_s=60, base_env=env,
            )  # fmt: skip
            procs.append(p)
            return o

        ok_nccl, ok_te, corrupt, dropped = await asyncio.gather(
            client("nccl", "nccl"),
            client("te", "transfer_engine"),
            client("corrupt", "nccl", env={"SGLANG_DOUBLE_CORRUPT": "1"}),
            client("dropped", "nccl", mutate=drop_group_ports),
        )
        assert ok_nccl.state == "verified" and ok_nccl.can_seed, ok_nccl.error
        assert ok_te.state == "verified" and not ok_te.can_seed, ok_te.error
        assert corrupt.state == "failed" and "differ from the seed" in corrupt.error
        assert dropped.state == "failed" and "fell back to loading from disk" in dropped.error
    finally:
        await stop(*procs)


@pytest.mark.parametrize(
    "keys", [("--admin-api-key", "adm"), ("--api-key", "usr"), ("--api-key", "usr", "--admin-api-key", "adm")]
)
async def test_supervisor_uses_sglangs_own_key(tiny_model, tmp_path, h, keys):
    """SGLang guards /server_info, /weights_checker and the TE info with its own keys (ADMIN_OPTIONAL): the
    supervisor sends the admin key if set, else the API key, and never seedfork's token."""
    ip = h.loopback_ip()
    port = h.free_port(ip)
    base = [sys.executable, str(DOUBLE), "--model-path", str(tiny_model), *keys]
    launch = sglang.render(base, pod_ip=ip, engine_port=port, bootstrap_port=h.free_port(ip), assignment=None)
    supervisor = sglang.SGLangSupervisor(launch, f"http://{ip}:{port}", None)
    assert supervisor.headers == {"Authorization": f"Bearer {keys[-1]}"}
    proc, out = await sglang.launch_and_supervise(
        launch, f"http://{ip}:{port}", None, str(tmp_path / "seed.log"), timeout_s=60
    )
    try:
        assert out.state == "verified", out.error
    finally:
        await stop(proc)


async def test_a_key_the_agent_cannot_see_is_named(tiny_model, tmp_path, h):
    ip = h.loopback_ip()
    port = h.free_port(ip)
    base = [sys.executable, str(DOUBLE), "--model-path", str(tiny_model)]
    launch = sglang.render(base, pod_ip=ip, engine_port=port, bootstrap_port=h.free_port(ip), assignment=None)
    proc, out = await sglang.launch_and_supervise(
        launch, f"http://{ip}:{port}", None, str(tmp_path / "seed.log"), timeout_s=60,
        base_env={**os.environ, "SGLANG_DOUBLE_CONFIG_ADMIN_KEY": "hidden"},
    )  # fmt: skip
    try:
        assert out.state == "failed"
        assert "401" in out.error and "--admin-api-key" in out.error and "cannot see" in out.error
    finally:
        await stop(proc)


def drop_group_ports(launch: sglang.Launch) -> sglang.Launch:
    """The command loses its group ports (as a stale template might): SGLang silently loads from disk."""
    argv = list(launch.argv)
    i = argv.index("--remote-instance-weight-loader-send-weights-group-ports")
    del argv[i : i + 2]
    return sglang.Launch(argv, launch.env, launch.role, launch.backend, launch.expected, launch.can_seed, launch.layout)


async def test_te_seed_without_mooncake_is_caught(tiny_model, tmp_path, h):
    """validate_transfer_engine fails if mooncake.engine cannot be imported; the seed flag is reset
    (docs/sglang.md, "Flags and resolution")."""
    shadow = tmp_path / "shadow" / "mooncake"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('mooncake not installed in this image')\n")
    env = {"PYTHONPATH": str(shadow.parent)}
    _, _, proc, out = await start(h, tiny_model, tmp_path, "seed-nomooncake", env=env)
    try:
        assert out.state == "failed"
        assert "TransferEngine validation failed" in out.error
    finally:
        await stop(proc)


def pod_env(h, ip, port, backend="transfer_engine"):
    return {
        **os.environ,
        "SEEDFORK_POD_NAME": "p", "SEEDFORK_POD_NAMESPACE": "ns", "SEEDFORK_SET": "s", "SEEDFORK_TOKEN": "k",
        "SEEDFORK_POD_IP": ip, "SEEDFORK_ENGINE_PORT": str(port), "SEEDFORK_BACKEND": backend, "SEEDFORK_TP": "2",
    }  # fmt: skip


def test_cli_render_reads_the_pod_contract(h, tmp_path):
    import subprocess

    a = Assignment(attempt=2, source="seed", backend="nccl", seed_ip="10.0.0.9", group_ports=[40010, 40011])
    out = subprocess.run(
        [sys.executable, "-m", "seedfork_agent.engines.sglang", "render", "--assignment", a.to_json(), "--", *BASE],
        env=pod_env(h, "10.0.0.2", 30001), capture_output=True, text=True, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout)
    assert got["role"] == "client" and got["env"]["SGLANG_HOST_IP"] == "10.0.0.2"
    ann = tmp_path / "assignment"
    ann.write_text(a.to_json())  # as a downward-API volume shows the annotation
    from_file = subprocess.run(
        [sys.executable, "-m", "seedfork_agent.engines.sglang", "render", "--assignment-file", str(ann), "--", *BASE],
        env=pod_env(h, "10.0.0.2", 30001), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(from_file.stdout) == got
    argv = got["argv"]
    assert argv[argv.index("--remote-instance-weight-loader-send-weights-group-ports") + 1] == "[40010,40011]"
    assert argv[argv.index("--remote-instance-weight-loader-seed-instance-service-port") + 1] == "30001"
    bad = subprocess.run(
        [sys.executable, "-m", "seedfork_agent.engines.sglang", "render", "--", *BASE, "--dp-size", "2"],
        env=pod_env(h, "10.0.0.2", 30001), capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "data parallel" in json.loads(bad.stdout)["error"]


async def test_cli_launch_supervises_a_seed(tiny_model, tmp_path, h):
    ip = h.loopback_ip()
    port = h.free_port(ip)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "seedfork_agent.engines.sglang", "launch", "--log", str(tmp_path / "s.log"),
        "--timeout", "60", "--", *double_base(tiny_model, 2),
        env=pod_env(h, ip, port), stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert json.loads(line) == {"state": "verified", "error": None, "canSeed": True}
        assert proc.returncode is None  # keeps running while SGLang serves
        proc.terminate()  # the pod stops: SGLang (in its own session) must stop too
        await asyncio.wait_for(proc.wait(), 20)
        with pytest.raises(OSError):
            for _ in range(50):
                socket.create_connection((ip, port), timeout=1).close()
                await asyncio.sleep(0.2)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, 15)
            await asyncio.wait_for(proc.wait(), 10)
