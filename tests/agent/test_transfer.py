"""Real multi-process transfers between agents, each on its own loopback IP.

gloo stands in for NCCL (same R-Fork group protocol, no GPU here); TransferEngine
is the real Mooncake non-CUDA wheel over TCP. Refusals are checked with the
puller called in the test process against a real seed process (saves a process start).
"""

from __future__ import annotations

import signal
import socket
import time

import httpx
import pytest
import torch

from seedfork_agent.puller import PullError, pull
from seedfork_agent.te import TransferEngineError, engine
from seedfork_api.contract import ERR_SELF_CHECK_FAILED


def _te_factory():
    return engine("127.0.0.1", "tcp", 20)


def test_gloo_then_transfer_engine_chain(kit, agents, seed, weight_tensors):
    """seed --gloo--> A --TransferEngine/TCP--> B: both byte for byte, and A seeds as soon as it is verified."""
    a_ip, b_ip = kit.new_ip(), kit.new_ip()
    a = agents(*kit.pull_args(a_ip, [seed.ip], "gloo", "--group-port", str(kit.new_port())), ip=a_ip)
    a.wait_ready()
    kit.assert_same_weights(a.tensors(), weight_tensors)
    p = a.progress()
    assert p["state"] == "verified" and p["serving"] and p["bytesDone"] == p["bytesTotal"] > 0
    served_before = kit.metric(seed, "seedfork_agent_bytes_served_total")
    assert served_before >= p["bytesTotal"]
    b = agents(*kit.pull_args(b_ip, [a.ip], "transfer_engine"), ip=b_ip)
    b.wait_ready()
    kit.assert_same_weights(b.tensors(), weight_tensors)
    assert b.events()[-1]["te"].startswith(b_ip + ":")
    assert kit.metric(a, 'seedfork_agent_transfers_total{backend="transfer_engine",result="ok",role="seed"}') == 1
    assert kit.metric(a, 'seedfork_agent_bytes_served_total{backend="transfer_engine"}') == p["bytesTotal"]


def test_gloo_cohort_of_three(kit, agents, seed, weight_tensors):
    port = kit.new_port()
    before = kit.metric(seed, 'seedfork_agent_transfers_total{backend="gloo",result="ok",role="seed"}')
    broadcasts = kit.metric(seed, 'seedfork_agent_transfer_seconds_count{backend="gloo",role="seed"}')
    clients = []
    for rank in (1, 2, 3):
        cip = kit.new_ip()
        cohort = ["--group-port", str(port), "--cohort-id", "c1", "--cohort-rank", str(rank), "--cohort-size", "4"]
        clients.append(agents(*kit.pull_args(cip, [seed.ip], "gloo", *cohort), ip=cip))
    for c in clients:
        c.wait_ready()
        kit.assert_same_weights(c.tensors(), weight_tensors)
    # One broadcast group of 1 seed + 3 clients served them all.
    after = kit.metric(seed, 'seedfork_agent_transfers_total{backend="gloo",result="ok",role="seed"}')
    assert after - before == 3
    assert kit.metric(seed, 'seedfork_agent_transfer_seconds_count{backend="gloo",role="seed"}') - broadcasts == 1


def test_weight_endpoints_need_the_token(kit, seed):
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
    r = httpx.post(seed.url + "/init_weights_send_group_for_remote_instance", headers=auth, content=b"{", timeout=5)
    assert r.status_code == 400
    two_ports = {"master_address": seed.ip, "ports": "1,2", "group_rank": 0, "world_size": 2, "group_name": "x"}
    r = httpx.post(seed.url + "/init_weights_send_group_for_remote_instance", headers=auth, json=two_ports, timeout=5)
    assert r.status_code == 400 and r.json()["success"] is False and "tp_size 1" in r.json()["message"]
    r = httpx.post(
        seed.url + "/send_weights_to_remote_instance",
        headers=auth,
        json={"master_address": seed.ip, "ports": "1", "group_name": "never_initialised"},
        timeout=5,
    )
    assert r.status_code == 400 and r.json()["success"] is False and "init_weights_send_group" in r.json()["message"]
    r = httpx.get(seed.url + "/remote_instance_transfer_engine_info?rank=1", headers=auth, timeout=5)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "Failed to get transfer engine info for rank 1"}}
    assert httpx.get(seed.url + "/healthz", timeout=5).status_code == 200  # still alive after bad requests
    with pytest.raises(PullError, match="401"):
        pull(kit.pull_request(seed.ip, "transfer_engine", token="wrong"), _te_factory)


def test_wrong_fingerprint_refused_before_any_byte_moves(kit, seed):
    served = kit.metric(seed, "seedfork_agent_bytes_served_total")
    transfers = kit.metric(seed, "seedfork_agent_transfers_total")
    log_before = len(seed.output())
    for backend, ports in (("transfer_engine", []), ("gloo", [kit.new_port()])):
        with pytest.raises(PullError, match="fingerprint mismatch"):
            pull(kit.pull_request(seed.ip, backend, fingerprint="fp-other", group_ports=ports), _te_factory)
    assert kit.metric(seed, "seedfork_agent_bytes_served_total") == served
    assert kit.metric(seed, "seedfork_agent_transfers_total") == transfers
    new_log = seed.output()[log_before:]
    assert "transfer_engine_info" not in new_log and "send_group" not in new_log


def test_seed_killed_mid_transfer_then_retry_from_second_seed(kit, agents, weights_dir, seed, weight_tensors):
    # This seed serves at ~1 MB/s, so the transfer is surely in flight when it dies.
    slow = agents(*kit.seed_args(weights_dir, ip := kit.new_ip(), "--bandwidth-limit-mbps", "1"), ip=ip)
    slow.wait_ready()
    cip = kit.new_ip()
    timeout_s = 20
    client = agents(*kit.pull_args(cip, [slow.ip, seed.ip], "gloo", "--group-port", str(kit.new_port())), ip=cip)
    deadline = time.monotonic() + 60
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
    assert time.monotonic() - killed < timeout_s
    assert client.progress()["attempt"] == 2
    kit.assert_same_weights(client.tensors(), weight_tensors)


def test_a_group_the_seed_refuses_ends_the_join_at_once(kit, seed):
    """The seed cannot build the group (here another process has bound the group port on its address) and
    answers the init call with a failure: the client stops joining and reports the seed's reason, instead of
    waiting out its rendezvous timeout, so the operator can re-seed it at once."""
    port = kit.new_port()
    with socket.socket() as squatter:
        squatter.bind((seed.ip, port))  # bound, not listening: the seed's store cannot bind, clients are refused
        started = time.monotonic()
        with pytest.raises(PullError, match="failed to build group"):
            pull(kit.pull_request(seed.ip, "gloo", group_ports=[port], timeout_s=120))
        assert time.monotonic() - started < 60  # half the rendezvous timeout: the refusal ended it, not the clock


@pytest.mark.parametrize("backend", ["transfer_engine", "gloo"])
def test_corrupted_bytes_never_verified_and_the_seed_takes_itself_out(kit, agents, weights_dir, backend):
    """The client's checksum mismatch makes the seed check its own store: it finds the flipped byte and stops
    serving (not Ready, no manifest), so no later client is offered the bad bytes."""
    bad_seed = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip)
    bad_seed.wait_ready()
    # Corrupt the seed's memory after it verified (a bad DIMM, a stray write): flip one byte.
    tensors = bad_seed.tensors()
    name = sorted(tensors)[2]
    tensors[name].view(-1).view(torch.uint8)[7] ^= 0x40
    ports = [kit.new_port()] if backend == "gloo" else []
    with pytest.raises(PullError, match=f"checksum mismatch in 1 of .* first {name}"):
        pull(kit.pull_request(bad_seed.ip, backend, group_ports=ports), _te_factory)

    deadline = time.monotonic() + 20
    while (progress := bad_seed.progress())["state"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert progress["state"] == "failed" and not progress["serving"], progress
    assert progress["error"].startswith(f"{ERR_SELF_CHECK_FAILED}: 1 of ") and name in progress["error"]
    assert httpx.get(f"{bad_seed.url}/readyz", timeout=5).status_code == 503
    with pytest.raises(PullError, match="answered 503"):
        pull(kit.pull_request(bad_seed.ip, backend, group_ports=ports), _te_factory)


def test_a_sound_seed_passes_its_self_check_and_keeps_serving(kit, seed):
    auth = {"Authorization": f"Bearer {kit.TOKEN}"}
    assert httpx.post(f"{seed.url}/v1/selfcheck", timeout=5).status_code == 401
    assert httpx.post(f"{seed.url}/v1/selfcheck", headers=auth, timeout=5).status_code == 202
    deadline = time.monotonic() + 20
    while kit.metric(seed, "seedfork_agent_checksum_seconds_count") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    progress = seed.progress()
    assert progress["state"] == "verified" and progress["serving"], progress


def test_a_failed_read_ends_the_pull_and_the_next_pull_works(kit, seed, weight_tensors, monkeypatch):
    """The read fails (the seed answered a pointer outside its memory, as a seed that just reloaded might):
    the pull fails with the transport's error, frees what it registered, tells the seed, and a second pull
    in the same process succeeds."""
    from seedfork_agent import puller

    real = puller._te_info_and_announce

    def stale_pointer(http, req):
        session, remote = real(http, req)
        name = sorted(remote)[len(remote) // 2]
        remote[name][0] += 1 << 40
        return session, remote

    failed = 'seedfork_agent_transfers_total{backend="transfer_engine",result="failed",role="seed"}'
    before = kit.metric(seed, failed)
    monkeypatch.setattr(puller, "_te_info_and_announce", stale_pointer)
    with pytest.raises(PullError, match="TransferEngineError"):
        pull(kit.pull_request(seed.ip, "transfer_engine"), _te_factory)
    assert kit.metric(seed, failed) == before + 1
    monkeypatch.setattr(puller, "_te_info_and_announce", real)
    store = pull(kit.pull_request(seed.ip, "transfer_engine"), _te_factory)
    try:
        kit.assert_same_weights({t.name: store.tensor(t.name) for t in store.manifest.tensors}, weight_tensors)
    finally:
        _te_factory().unregister(store.buffer.data_ptr())
        store.close()


def test_reads_from_our_seed_coalesce_only_where_both_sides_mirror():
    from seedfork_agent.puller import _coalesce

    # Three tensors back to back (padding 0 and 56 bytes), mirrored on the seed: one read covering all.
    assert _coalesce([1000, 2000, 3256], [9000, 10000, 11256], [1000, 1200, 10]) == ([1000], [9000], [2266])
    # The seed's third tensor sits elsewhere: two reads. A gap of a whole alignment unit or more: no merge.
    assert _coalesce([1000, 2000, 3256], [9000, 10000, 50000], [1000, 1200, 10]) == (
        [1000, 3256],
        [9000, 50000],
        [2200, 10],
    )
    assert _coalesce([0, 1256], [0, 1256], [1000, 8]) == ([0, 1256], [0, 1256], [1000, 8])
    assert _coalesce([], [], []) == ([], [], [])


def test_a_seeds_memory_is_exposed_to_transfer_engine_only_while_an_authorised_read_may_run(
    kit, weights_dir, tmp_path
):
    """Mooncake has no authentication: whoever holds a seed's pointers could read its registered memory.
    The seed registers its store when a client showed the token for the pointers, and unregisters it when
    that read is announced over (or could no longer run). A seed of its own: pointers other tests fetched
    without announcing a read (as stock SGLang clients do) rightly keep the module's seed open."""
    seed = kit.AgentProc(kit.seed_args(weights_dir, ip := kit.new_ip()), ip, tmp_path)
    try:
        seed.wait_ready()
        _exposure_follows_authorised_reads(kit, seed)
    finally:
        seed.kill(signal.SIGTERM)


def _exposure_follows_authorised_reads(kit, seed) -> None:
    auth = {"Authorization": f"Bearer {kit.TOKEN}"}
    url = f"{seed.url}/remote_instance_transfer_engine_info"

    def pointers() -> tuple[str, int, int]:
        r = httpx.get(url, params={"rank": 0}, headers=auth, timeout=10)
        r.raise_for_status()
        session, weights = r.json()["remote_instance_transfer_engine_info"]
        ptr, numel, elsize = next(iter(weights.values()))
        return session, int(ptr), int(numel) * int(elsize)

    def announce(event: str) -> None:
        body = {"client": "probe", "event": event, "bytes": 0}
        httpx.post(f"{seed.url}/v1/transfers", json=body, headers=auth, timeout=10).raise_for_status()

    te = _te_factory()
    session, ptr, n = pointers()  # opens
    dst = torch.zeros(n, dtype=torch.uint8)
    te.register(dst.data_ptr(), n)
    try:
        te.read(session, [dst.data_ptr()], [ptr], [n])  # the authorised read works
        assert dst.any()
        announce("start")
        announce("done")  # closes: nothing else is reading
        dst.zero_()
        with pytest.raises(TransferEngineError):
            te.read(session, [dst.data_ptr()], [ptr], [n])
        assert not dst.any()
        pointers()  # the next authorised client opens it again
        te.read(session, [dst.data_ptr()], [ptr], [n])
        assert dst.any()
    finally:
        announce("start")
        announce("done")
        te.unregister(dst.data_ptr())
