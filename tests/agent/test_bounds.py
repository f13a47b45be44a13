"""Nothing a dead or hostile peer does holds a seed or a cohort beyond a bound: real agent processes, each on
its own loopback IP, real gloo groups (NCCL's stand-in on CPU), real TransferEngine over TCP.

The set's timeout here is 60 s; every assertion below is far inside it, so each fails when a wait is
bounded by the timeout alone instead of ending when the other side is gone.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from seedfork_agent.puller import PullError, PullRequest, pull
from seedfork_agent.server import PENDING_GROUP_S
from seedfork_agent.te import engine
from seedfork_localdev.waiting import wait_until

TIMEOUT = "60"
SEED_ARGS = ("--timeout", TIMEOUT)  # for the shared `seed` fixture (conftest)


def _request(kit, seed_ip: str, backend: str, **kw) -> PullRequest:
    """A pull of its own (a client id no other pull has) under this module's timeout."""
    kw.setdefault("client_id", f"bounds-{time.monotonic_ns()}")
    return kit.pull_request(seed_ip, backend, timeout_s=float(TIMEOUT), **kw)


def _pull_ok(kit, seed_ip: str, backend: str, weight_tensors, **kw) -> None:
    te = engine("127.0.0.1", "tcp", float(TIMEOUT))
    store = pull(_request(kit, seed_ip, backend, **kw), lambda: te)
    try:
        kit.assert_same_weights({t.name: store.tensor(t.name) for t in store.manifest.tensors}, weight_tensors)
    finally:
        te.unregister(store.buffer.data_ptr())
        store.close()


def test_a_cohort_member_killed_before_the_group_forms_ends_the_cohort_for_all(kit, agents, seed, weight_tensors):
    """Three of a cohort's four clients (world 5) have asked the seed and sit in the group's rendezvous; one
    is killed (SIGKILL, as a node loss). The seed sees its init request close and ends the group: the other
    two fail within seconds, naming why, not after the rendezvous timeout (60 s) nor the pending bound; the
    seed keeps nothing pending and serves the next pull on the same port at once."""
    port = kit.new_port()
    clients = []
    for rank in (1, 2, 3):
        ip = kit.new_ip()
        cohort = ["--group-port", str(port), "--cohort-id", "k1", "--cohort-rank", str(rank), "--cohort-size", "5"]
        clients.append(agents(*kit.pull_args(ip, [seed.ip], "gloo", "--timeout", TIMEOUT, *cohort), ip=ip))

    def asked(c) -> bool:  # allocated: its init request goes out right after
        try:
            return c.progress()["bytesTotal"] > 0
        except httpx.HTTPError:
            return False

    wait_until(lambda: all(asked(c) for c in clients), 60, "all three clients to allocate and ask the seed")
    time.sleep(1.0)  # the init requests are in, and the members sit in the group's rendezvous
    assert all(c.proc.poll() is None for c in clients)
    clients[2].kill(signal.SIGKILL)
    killed = time.monotonic()
    for c in clients[:2]:
        assert c.wait_exit(timeout=float(TIMEOUT) + 30) == 1, c.output()[-2000:]
        waited = time.monotonic() - killed
        assert waited < PENDING_GROUP_S / 2, f"a member waited {waited:.0f}s for a dead peer"
        (failed,) = [e for e in c.events() if e["state"] == "failed"]
        assert "went away" in failed["error"], failed
    wait_until(lambda: kit.metric(seed, "seedfork_agent_pending_groups") == 0, 5, "the seed to drop the group")
    assert kit.metric(seed, 'seedfork_agent_groups_refused_total{reason="member_gone"}') == 1
    started = time.monotonic()
    _pull_ok(kit, seed.ip, "gloo", weight_tensors, group_ports=[port])  # the same port: nothing held it
    assert time.monotonic() - started < 15


def test_never_joining_group_inits_are_capped_and_expire(kit, seed, weight_tensors):
    """Eight authorised init requests that never join: the seed keeps at most maxClientsPerSeed (4) pending
    and answers the rest 429 at once; a real gloo pull meanwhile is refused at once with the reason (so the
    operator goes elsewhere) instead of queueing behind them; a TransferEngine pull is not slowed; the
    pending ones end after PENDING_GROUP_S; then a gloo pull from the same seed works."""
    auth = {"Authorization": f"Bearer {kit.TOKEN}"}
    answers: dict[int, tuple[float, httpx.Response | Exception]] = {}
    sent = time.monotonic()

    def ask(i: int, port: int) -> None:
        body = {"master_address": seed.ip, "ports": str(port), "world_size": 2, "group_name": f"junk{i}"}
        try:
            r = httpx.post(f"{seed.url}/init_weights_send_group_for_remote_instance", json=body, headers=auth,
                           timeout=float(TIMEOUT) + 30)  # fmt: skip
        except Exception as e:
            r = e
        answers[i] = (time.monotonic() - sent, r)

    threads = [threading.Thread(target=ask, args=(i, kit.new_port())) for i in range(8)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    wait_until(lambda: sum(1 for _, r in answers.values() if getattr(r, "status_code", 0) == 429) == 4, 10,
          "four 429 answers")  # fmt: skip
    assert kit.metric(seed, "seedfork_agent_pending_groups") == 4

    started = time.monotonic()
    with pytest.raises(PullError, match="429"):
        pull(_request(kit, seed.ip, "gloo", group_ports=[kit.new_port()]))
    assert time.monotonic() - started < 5
    started = time.monotonic()
    _pull_ok(kit, seed.ip, "transfer_engine", weight_tensors)
    assert time.monotonic() - started < 10

    for t in threads:
        t.join(PENDING_GROUP_S + 20)
    expired = [(s, r) for s, r in answers.values() if getattr(r, "status_code", 0) != 429]
    assert len(expired) == 4
    for s, r in expired:
        assert isinstance(r, httpx.Response) and r.status_code == 400, r
        assert "did not form" in r.json()["message"], r.text
        assert s < PENDING_GROUP_S + 10, s
    assert kit.metric(seed, "seedfork_agent_pending_groups") == 0
    started = time.monotonic()
    _pull_ok(kit, seed.ip, "gloo", weight_tensors, group_ports=[kit.new_port()])
    assert time.monotonic() - started < 15
