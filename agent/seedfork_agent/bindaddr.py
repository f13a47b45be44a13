"""Make a native library's wildcard binds bind one address instead.

Mooncake's TransferEngine (0.3.x) binds its RPC listener to ``INADDR_ANY`` and its TCP data listener to
``in6addr_any`` (dual stack), and no setting changes that: ``MC_TCP_BIND_ADDRESS`` only names the address
it advertises outside P2P-handshake mode. An agent must listen on its pod IP alone, so while the engine
initialises, the ``bind`` entries of its libraries' global offset tables point at a hook that turns a
wildcard address into the pod IP (a v4-mapped address for an IPv6 socket) and calls libc's ``bind``.
Other addresses pass through untouched. The entries are restored once the listeners exist.

The hook is Python called from C on the initialising thread (Mooncake binds there, holding the GIL).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterator, Sequence

_LIBC = ctypes.CDLL(None)
_REAL_BIND = ctypes.cast(_LIBC.bind, ctypes.c_void_p).value
_BIND_T = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32)
_real_bind = _BIND_T(_REAL_BIND)
_mprotect = _LIBC.mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PROT_RW, _PROT_R = mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ
_LOCK = threading.Lock()
_R_X86_64_GLOB_DAT, _R_X86_64_JUMP_SLOT = 6, 7


class BindPatchError(RuntimeError):
    pass


def got_offsets(path: str, symbol: str = "bind") -> list[int]:
    """Offsets (from the load base) of the GOT slots through which the ELF64 object at ``path`` calls ``symbol``."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BindPatchError(f"{path} is not a little-endian ELF64 object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    offsets = []
    for _, kind, _, _, off, size, link, _, _, entsize in sections:
        if kind != 4 or not entsize:  # SHT_RELA
            continue
        symtab = sections[link]
        strtab = sections[symtab[6]]
        for r in range(size // entsize):
            r_offset, r_info, _ = struct.unpack_from("<QQq", data, off + r * entsize)
            if r_info & 0xFFFFFFFF not in (_R_X86_64_GLOB_DAT, _R_X86_64_JUMP_SLOT):
                continue
            (name_off,) = struct.unpack_from("<I", data, symtab[4] + (r_info >> 32) * symtab[9])
            start = strtab[4] + name_off
            if data[start : data.index(b"\0", start)] == symbol.encode():
                offsets.append(r_offset)
    return offsets


def load_base(path: str) -> int:
    """Where the loaded object at ``path`` starts in this process (its mapping at file offset 0)."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    raise BindPatchError(f"{path} is not loaded in this process")


def loaded_objects(directories: Sequence[str]) -> list[str]:
    """Paths of the shared objects this process has mapped from files inside ``directories``."""
    roots = [os.path.realpath(d) + os.sep for d in directories]
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or ".so" not in os.path.basename(fields[5]) or fields[5] in found:
                continue
            if any(fields[5].startswith(root) for root in roots):
                found.append(fields[5])
    return found


def _hook_for(ip: str, binds: list[tuple[str, int]]):
    """A ``bind`` that moves wildcard addresses to ``ip`` and appends each successful bind's (ip, port)."""
    v4 = ipaddress.ip_address(ip)
    if v4.version != 4:
        raise BindPatchError(f"only an IPv4 pod address is supported, got {ip}")
    packed4 = v4.packed
    packed6 = ipaddress.IPv6Address(f"::ffff:{ip}").packed

    def hook(fd: int, addr: int, length: int) -> int:
        family = ctypes.c_uint16.from_address(addr).value
        sa = bytearray(ctypes.string_at(addr, length))
        if family == socket.AF_INET and length >= 16:
            if sa[4:8] == b"\0" * 4:
                sa[4:8] = packed4
            where = str(ipaddress.IPv4Address(bytes(sa[4:8])))
        elif family == socket.AF_INET6 and length >= 28:
            if sa[8:24] == b"\0" * 16:
                sa[8:24] = packed6
            mapped = ipaddress.IPv6Address(bytes(sa[8:24]))
            where = str(mapped.ipv4_mapped or mapped)
        else:
            return _real_bind(fd, addr, length)
        buf = (ctypes.c_char * length).from_buffer(sa)
        _reuse_address(fd)
        rc = _real_bind(fd, ctypes.addressof(buf), length)
        if rc == 0:
            binds.append((where, int.from_bytes(sa[2:4], "big")))
        return rc

    return _BIND_T(hook)


def _reuse_address(fd: int) -> None:
    """SO_REUSEADDR on a TCP socket before it binds: the pod IP and ports of an engine that ended moments ago
    (a restarted agent, a pod IP given out again) may still have connections in TIME_WAIT, and without it
    Mooncake's binds fail on them for a minute. Two listeners still cannot share a port."""
    kind, size = ctypes.c_int(0), ctypes.c_uint32(ctypes.sizeof(ctypes.c_int))
    if _LIBC.getsockopt(fd, socket.SOL_SOCKET, socket.SO_TYPE, ctypes.byref(kind), ctypes.byref(size)) != 0:
        return
    if kind.value == socket.SOCK_STREAM:
        one = ctypes.c_int(1)
        _LIBC.setsockopt(fd, socket.SOL_SOCKET, socket.SO_REUSEADDR, ctypes.byref(one), ctypes.sizeof(one))


def _writable(addr: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return perms[1] == "w"
    raise BindPatchError(f"{addr:#x} is not mapped")


def _write_slot(slot: int, value: int) -> int:
    """Store ``value`` in the 8-byte slot, lifting and restoring a read-only (RELRO) page's protection."""
    page = slot & ~(mmap.PAGESIZE - 1)
    old = ctypes.c_void_p.from_address(slot).value or 0
    locked = not _writable(slot)
    if locked and _mprotect(page, mmap.PAGESIZE, _PROT_RW) != 0:
        raise BindPatchError(f"mprotect of the GOT page at {page:#x} failed")
    ctypes.c_void_p.from_address(slot).value = value
    if locked:
        _mprotect(page, mmap.PAGESIZE, _PROT_R)
    return old


@contextlib.contextmanager
def wildcard_binds_to(ip: str, objects: Sequence[str]) -> Iterator[list[tuple[str, int]]]:
    """While inside, a wildcard ``bind`` called from any of ``objects`` (loaded library paths) binds ``ip``.

    Yields the list of (ip, port) that the library's successful binds took, filled as they happen."""
    binds: list[tuple[str, int]] = []
    hook = _hook_for(ip, binds)
    target = ctypes.cast(hook, ctypes.c_void_p).value
    patched: list[tuple[int, int]] = []
    with _LOCK:
        try:
            for path in objects:
                base = load_base(path)
                for off in got_offsets(path):
                    patched.append((base + off, _write_slot(base + off, target)))
            if not patched:
                raise BindPatchError(f"no bind slot found in {', '.join(objects) or 'no library'}")
            yield binds
        finally:
            for slot, old in reversed(patched):
                _write_slot(slot, old)
