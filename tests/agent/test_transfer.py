"""Real multi-process transfers between agents, each on its own loopback IP.

gloo stands in for NCCL (same R-Fork group protocol, no GPU here); TransferEngine
is the real Mooncake non-CUDA wheel over TCP.
"""

from __future__ import annotations

import signal
import time

import httpx
import torch


def _metric(agent, name: str) -> float:
    text = httpx.get(f"{agent.url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_gloo_one_client_byte_for_byte(kit, agents, weights_dir, weight_tensors):
    seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    seed.wait_ready()
    client_ip = kit.new_ip()
    client = agents(*kit.pull_args(client_ip, [seed.ip], "gloo", "--group-port", str(kit.new_port())), ip=client_ip)
    client.wait_ready()
    kit.assert_same_weights(client.tensors(), weight_tensors)
    p = client.progress()
    assert p["state"] == "verified" and p["serving"] and p["bytesDone"] == p["bytesTotal"] > 0
    assert _metric(seed, "seedfork_agent_bytes_served_total") == p["bytesTotal"]
    # The client now seeds a third pod itself.
    third_ip = kit.new_ip()
    third = agents(*kit.pull_args(third_ip, [client.ip], "gloo", "--group-port", str(kit.new_port())), ip=third_ip)
    third.wait_ready()
    kit.assert_same_weights(third.tensors(), weight_tensors)


def test_gloo_cohort_of_three(kit, agents, weights_dir, weight_tensors):
    seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    seed.wait_ready()
    port = kit.new_port()
    clients = []
    for rank in (1, 2, 3):
        cip = kit.new_ip()
        cohort = ["--group-port", str(port), "--cohort-id", "c1", "--cohort-rank", str(rank), "--cohort-size", "4"]
        clients.append(agents(*kit.pull_args(cip, [seed.ip], "gloo", *cohort), ip=cip))
    for c in clients:
        c.wait_ready()
        kit.assert_same_weights(c.tensors(), weight_tensors)
    # One broadcast served the whole cohort: one seed-side transfer counted per client, bytes times three.
    total = clients[0].progress()["bytesTotal"]
    assert _metric(seed, "seedfork_agent_bytes_served_total") == 3 * total
    assert _metric(seed, 'seedfork_agent_transfers_total{backend="gloo",result="ok",role="seed"}') == 3


def test_transfer_engine_tcp_byte_for_byte(kit, agents, weights_dir, weight_tensors):
    seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    seed.wait_ready()
    cip = kit.new_ip()
    client = agents(*kit.pull_args(cip, [seed.ip], "transfer_engine"), ip=cip)
    client.wait_ready()
    kit.assert_same_weights(client.tensors(), weight_tensors)
    assert client.events()[-1]["te"].startswith(cip + ":")  # serves over TE in turn
    assert _metric(seed, 'seedfork_agent_transfers_total{backend="transfer_engine",result="ok",role="seed"}') == 1


def test_weight_endpoints_need_the_token(kit, agents, weights_dir):
    seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    seed.wait_ready()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": kit.TOKEN}):
        for method, path in [
            ("GET", "/v1/manifest"),
            ("GET", "/v1/attach"),
            ("POST", "/v1/transfers"),
            ("POST", "/init_weights_send_group_for_remote_instance"),
            ("POST", "/send_weights_to_remote_instance"),
            ("GET", "/remote_instance_transfer_engine_info?rank=0"),
            ("GET", "/get_remote_instance_transfer_engine_info?rank=0"),
        ]:
            r = httpx.request(method, seed.url + path, headers=headers, json={}, timeout=5)
            assert r.status_code == 401, (path, headers, r.status_code)
    for path in ("/healthz", "/readyz", "/metrics", "/v1/progress"):
        assert httpx.get(seed.url + path, timeout=5).status_code == 200, path
    auth = {"Authorization": f"Bearer {kit.TOKEN}"}
    assert httpx.get(seed.url + "/v1/manifest", headers=auth, timeout=5).status_code == 200
    info = httpx.get(seed.url + "/remote_instance_transfer_engine_info?rank=0", headers=auth, timeout=5).json()
    assert info["rank"] == 0 and len(info["remote_instance_transfer_engine_info"]) == 2
    bad = httpx.get(seed.url + "/remote_instance_transfer_engine_info?rank=x", headers=auth, timeout=5)
    assert bad.status_code == 400 and bad.json() == {"error": {"message": "Missing or invalid rank parameter"}}
    # A client with the wrong token fails with the reason and never becomes ready.
    cip = kit.new_ip()
    client = agents(*kit.pull_args(cip, [seed.ip], "transfer_engine"), ip=cip, env={"SEEDFORK_TOKEN": "wrong"})
    assert client.wait_exit() == 1
    assert "401" in client.events()[-1]["error"]


def test_wrong_fingerprint_refused_before_any_byte_moves(kit, agents, weights_dir):
    seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    seed.wait_ready()
    for backend, extra in (("transfer_engine", []), ("gloo", ["--group-port", str(kit.new_port())])):
        cip = kit.new_ip()
        args = kit.pull_args(cip, [seed.ip], backend, *extra)
        args[args.index("fp-test")] = "fp-other"
        client = agents(*args, ip=cip)
        assert client.wait_exit() == 1
        assert "fingerprint mismatch" in client.events()[-1]["error"]
    out = seed.output()
    assert "transfer_engine_info" not in out and "send_group" not in out
    assert _metric(seed, "seedfork_agent_bytes_served_total") == 0
    assert _metric(seed, "seedfork_agent_transfers_total") == 0


def test_seed_killed_mid_transfer_then_retry_from_second_seed(kit, agents, weights_dir, weight_tensors):
    # The first seed serves at ~1 MB/s so the transfer is surely in flight when it dies.
    slow = agents(*kit.seed_args(weights_dir, ip := kit.new_ip(), "--bandwidth-limit-mbps", "1"), ip=ip)
    good = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    slow.wait_ready()
    good.wait_ready()
    cip = kit.new_ip()
    timeout_s = 20
    client = agents(*kit.pull_args(cip, [slow.ip, good.ip], "gloo", "--group-port", str(kit.new_port())), ip=cip)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if client.progress()["bytesDone"] > 0:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("transfer never started:\n" + client.output())
    slow.kill(signal.SIGKILL)
    killed = time.monotonic()
    client.wait_ready(timeout=timeout_s + 30)
    failed = [e for e in client.events() if e["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["seed"] == f"{slow.ip}:{kit.AGENT_PORT}", client.output()[-2000:]
    assert time.monotonic() - killed < timeout_s + 15
    assert client.progress()["attempt"] == 2
    kit.assert_same_weights(client.tensors(), weight_tensors)


def test_corrupted_bytes_never_verified(kit, agents, weights_dir):
    seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    seed.wait_ready()
    # Corrupt the seed's memory after it verified (a bad DIMM, a stray write): flip one byte.
    tensors = seed.tensors()
    name = sorted(tensors)[2]
    tensors[name].view(-1).view(torch.uint8)[7] ^= 0x40
    for backend, extra in (("transfer_engine", []), ("gloo", ["--group-port", str(kit.new_port())])):
        cip = kit.new_ip()
        client = agents(*kit.pull_args(cip, [seed.ip], backend, *extra), ip=cip)
        assert client.wait_exit() == 1
        err = client.events()[-1]["error"]
        assert "checksum mismatch in 1 of" in err and name in err, err
        assert not any(e["state"] == "verified" for e in client.events())
