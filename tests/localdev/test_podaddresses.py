"""The pod runner's loopback addresses: the lowest free one, never one another holder has (no cluster needed)."""

from __future__ import annotations

import pytest

from seedfork_localdev.podaddresses import lease_address


def test_each_lease_gets_the_lowest_address_nobody_holds(tmp_path):
    a = lease_address(2, 4, tmp_path)
    b = lease_address(2, 4, tmp_path)  # the same process: the lock alone keeps them apart
    assert (a.ip, b.ip) == ("127.0.0.2", "127.0.0.3")
    a.release()
    c = lease_address(2, 4, tmp_path)
    assert c.ip == "127.0.0.2"
    for lease in (b, c):
        lease.release()


def test_a_second_release_frees_nothing_leased_since(tmp_path):
    a = lease_address(2, 2, tmp_path)
    a.release()
    b = lease_address(2, 2, tmp_path)
    a.release()  # the pod's address is released twice (termination and the runner's stop)
    with pytest.raises(RuntimeError, match=r"no free pod address in 127\.0\.0\.2-2"):
        lease_address(2, 2, tmp_path)
    b.release()
    c = lease_address(2, 2, tmp_path)
    assert c.ip == "127.0.0.2"
    c.release()


def test_every_address_held_is_an_error(tmp_path):
    held = [lease_address(2, 3, tmp_path) for _ in range(2)]
    assert [h.ip for h in held] == ["127.0.0.2", "127.0.0.3"]
    with pytest.raises(RuntimeError, match="no free pod address"):
        lease_address(2, 3, tmp_path)
    for lease in held:
        lease.release()
