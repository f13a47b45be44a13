"""One Mooncake TransferEngine per agent process, and what it has registered.

The engine is created once: its transport is fixed at initialisation (Mooncake
reads the selecting environment variables then), and a process both pulls with
it and, afterwards, serves from the same registration. Registrations are
tracked because Mooncake rejects any overlapping or repeated registration.
"""

from __future__ import annotations

import os
import threading

import torch

PROTOCOLS = ("tcp", "rdma", "nvlink_intra")


class TransferEngineError(RuntimeError):
    pass


def resolve_protocol(protocol: str, device: torch.device) -> str:
    if protocol in PROTOCOLS:
        return protocol
    if protocol != "auto":
        raise ValueError(f"unknown TransferEngine protocol {protocol!r}")
    # Host memory moves over TCP; GPU memory over RDMA (Mooncake falls back to TCP without HCAs).
    return "tcp" if device.type == "cpu" else "rdma"


class TransferEngineHandle:
    def __init__(self, host: str, protocol: str, timeout_s: float) -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:
            raise TransferEngineError(f"Mooncake TransferEngine is not installed: {e}") from None
        if protocol == "nvlink_intra":
            os.environ.setdefault("MC_INTRANODE_NVLINK", "1")
        elif protocol == "tcp":
            os.environ.setdefault("MC_FORCE_TCP", "1")
        # A peer may register new memory after we first connected (a seed that reloaded its store):
        # never trust a cached copy of its segment descriptor, as we never reuse its pointers.
        os.environ.setdefault("MC_DISABLE_METACACHE", "1")
        # A sync read gives up after this many seconds (plus ~1 s per GB); Mooncake's minimum is 5.
        os.environ["MC_TRANSFER_TIMEOUT"] = str(max(5, int(timeout_s)))
        self.protocol = protocol
        self.host = host
        self._engine = TransferEngine()
        rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, "")
        if rc != 0:
            raise TransferEngineError(f"TransferEngine.initialize({host}, {protocol}) returned {rc}")
        self.session_id = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: dict[int, int] = {}
        self._lock = threading.Lock()

    def register(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            if self._registered.get(ptr) == nbytes:
                return
            rc = self._engine.register_memory(ptr, nbytes)
            if rc != 0:
                raise TransferEngineError(f"register_memory({ptr:#x}, {nbytes}) returned {rc}")
            self._registered[ptr] = nbytes

    def unregister(self, ptr: int) -> None:
        with self._lock:
            if self._registered.pop(ptr, None) is not None:
                self._engine.unregister_memory(ptr)

    def is_registered(self, ptr: int) -> bool:
        return ptr in self._registered

    def read(self, session_id: str, local: list[int], remote: list[int], lengths: list[int]) -> None:
        """One batch of one-sided reads from the peer; raises on any failure."""
        if not local:
            return
        rc = self._engine.batch_transfer_sync_read(session_id, local, remote, lengths)
        if rc < 0:
            raise TransferEngineError(f"batch_transfer_sync_read from {session_id} returned {rc}")


_ENGINE: TransferEngineHandle | None = None
_ENGINE_LOCK = threading.Lock()


def engine(host: str, protocol: str, timeout_s: float) -> TransferEngineHandle:
    """The process's engine, created on first use."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = TransferEngineHandle(host, protocol, timeout_s)
        elif _ENGINE.protocol != protocol or _ENGINE.host != host:
            raise TransferEngineError(
                f"this process's TransferEngine runs {_ENGINE.protocol} on {_ENGINE.host}; "
                f"{protocol} on {host} was asked for"
            )
        return _ENGINE
