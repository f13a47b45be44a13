"""Clients of the pod's own plain-HTTP addresses build no TLS context: loading the CA bundle costs 30-60 ms of
CPU per client, on the agent's event loop, on a promotion's critical path."""

from __future__ import annotations

import ssl

import pytest

from seedfork_agent import plainhttp
from seedfork_agent.engineprobe import EngineProbe, HealthProbe


def test_only_plain_http_skips_verification():
    assert plainhttp.verify("http://10.0.0.5:18080") is False
    assert plainhttp.verify("https://10.0.0.5:18080") is True
    assert plainhttp.verify("HTTP-ish") is True  # anything else keeps httpx's verification


@pytest.fixture
def no_ca_bundle(monkeypatch):
    """A client that loads the CA bundle fails here."""

    def refuse(*_a, **_k):
        raise AssertionError("a client of a plain-HTTP address loaded the CA bundle")

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", refuse)


@pytest.mark.parametrize("probe", [EngineProbe("127.0.0.1", 9, "t"), HealthProbe("127.0.0.1", 9)])
async def test_engine_probes_build_no_tls_context(no_ca_bundle, probe):
    assert await probe.info() is None  # nothing listens there; what matters is that no CA bundle was loaded
