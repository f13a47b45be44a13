"""What the operator does with the token Secret it finds. Pure."""

from __future__ import annotations

from seedfork_operator.tokensecret import decide, token_digest


def step(found, last=None, pods=(), named=False):
    return decide(secret="s", namespace="ns", named=named, found=found, last_token=last, pod_digests=pods,
                  new_token="fresh")  # fmt: skip


def test_a_new_set_gets_a_fresh_token_without_fuss():
    s = step(None)
    assert s.create == {"token": "fresh"} and s.token == "fresh" and s.event is None


def test_a_deleted_secret_comes_back_with_the_token_last_read():
    s = step(None, last="t1", pods=[token_digest("t1")])
    assert s.create == {"token": "t1"} and s.event[0] == "TokenSecretRecreated"


def test_a_named_secret_is_never_made_up():
    s = step(None, last="t1", named=True)
    assert s.create is None and s.problem[0] == "TokenSecretMissing"


def test_a_rotation_keeps_the_old_token_as_previous_then_drops_it():
    s = step({"token": "t2"}, last="t1", pods=[token_digest("t1")])
    assert s.patch == {"previous": "t1"} and s.token == "t2"
    s = step({"token": "t2", "previous": "t1"}, last="t2", pods=[token_digest("t1"), token_digest("t2")])
    assert s.patch is None and s.problem is None  # a pod still holds t1
    s = step({"token": "t2", "previous": "t1"}, last="t2", pods=[token_digest("t2")])
    assert s.patch == {"previous": None} and s.event[0] == "TokenGraceEnded"


def test_after_a_restart_the_secret_as_found_is_reused():
    s = step({"token": "t1"}, last=None, pods=[token_digest("t1")])
    assert s.token == "t1" and s.create is None and s.patch is None and s.problem is None


def test_pods_holding_a_token_the_secret_lost_degrade_the_set():
    s = step({"token": "t2"}, last=None, pods=[token_digest("t1")])
    assert s.problem[0] == "TokenUnknownToPods" and "previous" in s.problem[1]
    assert step({"token": ""}).problem[0] == "TokenSecretInvalid"
