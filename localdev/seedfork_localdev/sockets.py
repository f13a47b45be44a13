"""The TCP listeners a process holds, read from /proc (what ``ss -ltnp`` shows for it)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    address: str  # as bound: "0.0.0.0" and "::" mean every address; a v4-mapped v6 address is shown as IPv4
    port: int
    family: int  # 4 or 6

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.address).is_unspecified

    def __str__(self) -> str:
        return f"{self.address}:{self.port}" if self.family == 4 else f"[{self.address}]:{self.port}"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _address(hex_addr: str, family: int) -> str:
    raw = bytes.fromhex(hex_addr)
    if family == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc prints an IPv6 address as four host-order 32-bit words
    addr = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return str(addr.ipv4_mapped or addr)


def listeners(pid: int) -> list[Listener]:
    """Every listening TCP socket that process ``pid`` holds."""
    inodes = _socket_inodes(pid)
    found = []
    for name, family in (("tcp", 4), ("tcp6", 6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as table:
                rows = table.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != _LISTEN or inode not in inodes:
                continue
            addr, port = local.split(":")
            found.append(Listener(_address(addr, family), int(port, 16), family))
    return found


def ephemeral_ports() -> tuple[int, int]:
    """This network namespace's range for ports the kernel picks (``bind`` to port 0, ``connect``)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = f.read().split()
    return int(lo), int(hi)
