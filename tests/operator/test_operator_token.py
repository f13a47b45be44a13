"""The token Secret's lifecycle on the real apiserver: deleted, rotated, and read back after a restart."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from seedfork_api import contract as c
from seedfork_operator.runner import OperatorThread
from seedfork_operator.tokensecret import token_digest

pytestmark = pytest.mark.cluster


def secret_data(sets, name: str) -> dict[str, str] | None:
    try:
        found = sets.core.read_namespaced_secret(name, sets.namespace)
    except Exception:
        return None
    return {k: base64.b64decode(v).decode() for k, v in (found.data or {}).items()}


def token_secret(sets, name: str) -> str:
    return (sets.get(name).get("status") or {}).get("tokenSecret", "")


def test_a_deleted_token_secret_comes_back_with_the_token_the_pods_hold(
    crd, nodes, sets, wait, namespace, operator_config
):
    # Passes 30 s apart: only the Secret's watch can bring the operator back within the 5 s below.
    with OperatorThread([namespace], replace(operator_config, interval=30)):
        sets.create("keep", replicas=1)
        wait("ready", lambda: sum(v.ready for v in sets.views("keep")) == 1)
        secret = wait("status", lambda: token_secret(sets, "keep"))
        token = secret_data(sets, secret)[c.TOKEN_SECRET_KEY]
        assert sets.views("keep")[0].token_digest == token_digest(token)

        sets.core.delete_namespaced_secret(secret, sets.namespace)
        again = wait("Secret recreated", lambda: secret_data(sets, secret), timeout=5)
        assert again[c.TOKEN_SECRET_KEY] == token  # existing seeds keep answering new pods
        wait("event", lambda: any(r == "TokenSecretRecreated" for r, _ in sets.events()))


def test_a_restarted_operator_reuses_the_secret(crd, nodes, sets, wait, namespace, operator_config):
    with OperatorThread([namespace], operator_config):
        sets.create("again", replicas=1)
        wait("ready", lambda: sum(v.ready for v in sets.views("again")) == 1)
    secret = token_secret(sets, "again")
    token = secret_data(sets, secret)[c.TOKEN_SECRET_KEY]
    with OperatorThread([namespace], operator_config):
        sets.scale("again", 2)
        wait("2 ready", lambda: sum(v.ready for v in sets.views("again")) == 2)
    assert secret_data(sets, secret)[c.TOKEN_SECRET_KEY] == token
    assert {v.token_digest for v in sets.views("again")} == {token_digest(token)}


def test_a_rotation_keeps_the_old_token_until_no_pod_holds_it(operator, nodes, sets, wait):
    sets.create("rotate", replicas=1)
    wait("ready", lambda: sum(v.ready for v in sets.views("rotate")) == 1)
    secret = token_secret(sets, "rotate")
    old = secret_data(sets, secret)[c.TOKEN_SECRET_KEY]
    (first,) = sets.views("rotate")

    new = "a-new-token-from-the-admin"
    sets.core.patch_namespaced_secret(secret, sets.namespace, {"stringData": {c.TOKEN_SECRET_KEY: new}})
    data = wait("old token kept as previous", lambda: c.TOKEN_PREVIOUS_KEY in (d := secret_data(sets, secret)) and d, 5)
    assert data == {c.TOKEN_SECRET_KEY: new, c.TOKEN_PREVIOUS_KEY: old}
    wait("event", lambda: any(r == "TokenRotated" for r, _ in sets.events()))

    sets.scale("rotate", 2)
    wait("2 ready", lambda: sum(v.ready for v in sets.views("rotate")) == 2)
    (second,) = [v for v in sets.views("rotate") if v.uid != first.uid]
    assert second.token_digest == token_digest(new)
    pod = next(p for p in sets.pods("rotate") if p["metadata"]["uid"] == second.uid)
    env = {e["name"]: e for e in pod["spec"]["containers"][-1]["env"]}
    ref = env[c.ENV_TOKEN_PREVIOUS]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret, "key": c.TOKEN_PREVIOUS_KEY, "optional": True}
    assert secret_data(sets, secret)[c.TOKEN_PREVIOUS_KEY] == old  # the first pod still holds it

    sets.core.delete_namespaced_pod(first.name, sets.namespace)  # its replacement starts with the new token
    wait("grace over", lambda: c.TOKEN_PREVIOUS_KEY not in secret_data(sets, secret), timeout=20)
    assert {v.token_digest for v in sets.views("rotate")} <= {token_digest(new)}
    wait("event", lambda: any(r == "TokenGraceEnded" for r, _ in sets.events()))
