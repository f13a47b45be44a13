"""The pod runner's pod addresses on loopback: one 127.0.0.x per pod, unique on this machine.

x counts up from 2 (127.0.0.1 is the host's: the API server's and the nodes' address). A pod's address is
held by an advisory lock (flock) on a file under the system temp dir while the pod lives. The lock is the
only record: flock locks belong to an open file, so they conflict within one process as across processes,
and the runners of parallel test sessions never share an address; a runner that dies frees its addresses
with its file descriptors.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from pathlib import Path

LOCK_DIR = Path(tempfile.gettempdir()) / "seedfork-podrunner-ips"


class AddressLease:
    """One address, held until ``release`` (which may be called more than once)."""

    def __init__(self, ip: str, fd: int) -> None:
        self.ip = ip
        self._fd = fd  # holds the lock

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing drops the flock
            self._fd = -1


def lease_address(first: int = 2, last: int = 254, lock_dir: Path = LOCK_DIR) -> AddressLease:
    """The lowest 127.0.0.x, ``first`` <= x <= ``last``, that nobody on this machine holds."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for x in range(first, last + 1):
        ip = f"127.0.0.{x}"
        fd = os.open(lock_dir / f"{ip}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            _check_usable(ip)
        except BaseException:
            os.close(fd)
            raise
        return AddressLease(ip, fd)
    raise RuntimeError(f"no free pod address in 127.0.0.{first}-{last}")


def _check_usable(ip: str) -> None:
    try:
        with socket.socket() as sock:
            sock.bind((ip, 0))
    except OSError as exc:
        raise RuntimeError(
            f"loopback address {ip} is not usable here ({exc}); on Linux all of 127/8 is local, "
            "elsewhere add loopback aliases"
        ) from exc
