"""A token rotation's grace period: pods started before and after it pull from each other (real agents, real TE and
gloo); without the previous token a seed that predates the rotation refuses the pull."""

from __future__ import annotations

import pytest

from seedfork_agent.puller import PullError, PullRequest, pull
from seedfork_agent.te import engine

OLD, NEW = "token-before-rotation", "token-after-rotation"


def _request(kit, seed_ip: str, backend: str, token: str, previous: str | None, ports: list[int]) -> PullRequest:
    return PullRequest(
        seed_ip=seed_ip,
        seed_port=kit.AGENT_PORT,
        token=token,
        token_previous=previous,
        backend=backend,
        fingerprint="fp-test",
        client_id="rotation-client",
        timeout_s=20,
        group_ports=ports,
    )


def _te():
    return engine("127.0.0.1", "tcp", 20)


@pytest.mark.parametrize("backend", ["transfer_engine", "gloo"])
def test_pods_from_both_sides_of_a_rotation_pull_from_each_other(kit, agents, weights_dir, weight_tensors, backend):
    before = agents(*kit.seed_args(weights_dir, ip := kit.new_ip()), ip=ip, env={"SEEDFORK_TOKEN": OLD})
    after = agents(
        *kit.seed_args(weights_dir, ip := kit.new_ip()),
        ip=ip,
        env={"SEEDFORK_TOKEN": NEW, "SEEDFORK_TOKEN_PREVIOUS": OLD},
    )
    before.wait_ready()
    after.wait_ready()
    ports = lambda: [kit.new_port()] if backend == "gloo" else []  # noqa: E731

    # a new pod (new token, old one as previous) pulls from a seed that started before the rotation
    store = pull(_request(kit, before.ip, backend, NEW, OLD, ports()), _te)
    kit.assert_same_weights({t.name: store.tensor(t.name) for t in store.manifest.tensors}, weight_tensors)
    store.close()
    # an old pod (old token only) pulls from a seed that started after it
    store = pull(_request(kit, after.ip, backend, OLD, None, ports()), _te)
    store.close()
    # once the grace period is over (no previous token), the old seed lets nobody with only the new token in
    with pytest.raises(PullError, match="rejected the token"):
        pull(_request(kit, before.ip, backend, NEW, None, ports()), _te)
