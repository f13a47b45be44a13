"""One Mooncake TransferEngine per agent process, and what it has registered.

The engine is created once: its transport is fixed at initialisation (Mooncake
reads the selecting environment variables then), and a process both pulls with
it and, afterwards, serves from the same registration. Registrations are
tracked because Mooncake rejects any overlapping or repeated registration.

Its two listeners (RPC handshake and TCP data) bind the pod IP (``bindaddr``: Mooncake itself binds all
addresses) on ports of the set's range (``MC_MIN_RPC_PORT``/``MC_MAX_RPC_PORT``, which Mooncake reads once,
at its first engine); the engine checks where they landed and refuses to run anywhere else.
"""

from __future__ import annotations

import os
import threading

import torch

from seedfork_api.spec import MOONCAKE_REFUSED_PORTS

from . import bindaddr

PROTOCOLS = ("tcp", "rdma", "nvlink_intra")
INIT_ATTEMPTS = 3


class TransferEngineError(RuntimeError):
    pass


def resolve_protocol(protocol: str, device: torch.device) -> str:
    if protocol in PROTOCOLS:
        return protocol
    if protocol != "auto":
        raise ValueError(f"unknown TransferEngine protocol {protocol!r}")
    # Host memory moves over TCP; GPU memory over RDMA (Mooncake falls back to TCP without HCAs).
    return "tcp" if device.type == "cpu" else "rdma"


def _mooncake_dirs() -> list[str]:
    """Mooncake's package and the wheel's bundled libraries (``mooncake_transfer_engine*.libs``)."""
    import mooncake

    package = os.path.dirname(mooncake.__file__)
    site = os.path.dirname(package)
    return [package] + [
        os.path.join(site, d) for d in os.listdir(site) if d.startswith("mooncake") and d.endswith(".libs")
    ]


_MOONCAKE_REFUSED = MOONCAKE_REFUSED_PORTS  # there it listens in 15000-17000 instead


class TransferEngineHandle:
    def __init__(self, host: str, protocol: str, timeout_s: float, ports: tuple[int, int] | None = None) -> None:
        if ports is not None:
            lo, hi = ports
            if hi - lo + 1 < 2 or lo < 1024 or (lo <= _MOONCAKE_REFUSED[1] and hi >= _MOONCAKE_REFUSED[0]):
                raise TransferEngineError(
                    f"TransferEngine needs two ports outside {_MOONCAKE_REFUSED[0]}-{_MOONCAKE_REFUSED[1]} "
                    f"(Mooncake refuses that range), got {lo}-{hi}: move spec.transfer.ports"
                )
            # Read when Mooncake's module loads: set before the import.
            os.environ["MC_MIN_RPC_PORT"], os.environ["MC_MAX_RPC_PORT"] = str(lo), str(hi)
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
        libraries = bindaddr.loaded_objects(_mooncake_dirs())
        # Mooncake picks its TCP data port at random in the range and may pick one that another pod's engine on
        # the same node holds (its availability check binds all addresses): a fresh engine picks again.
        for attempt in range(1, INIT_ATTEMPTS + 1):
            self._engine = TransferEngine()
            with bindaddr.wildcard_binds_to(host, libraries) as binds:
                rc = self._engine.initialize(host, "P2PHANDSHAKE", protocol, "")
            if rc == 0:
                break
            if attempt == INIT_ATTEMPTS:
                raise TransferEngineError(
                    f"TransferEngine.initialize({host}, {protocol}) returned {rc} ({INIT_ATTEMPTS} tries)"
                )
        self.listen_ports = sorted({port for ip, port in binds if ip == host})
        stray = [f"{ip}:{port}" for ip, port in binds if ip != host or (ports and not ports[0] <= port <= ports[1])]
        if stray:
            raise TransferEngineError(f"TransferEngine listens outside {host} {ports}: {', '.join(stray)}")
        self.session_id = f"{host}:{self._engine.get_rpc_port()}"
        self._registered: dict[int, int] = {}
        self._lock = threading.Lock()

    def register(self, ptr: int, nbytes: int) -> None:
        with self._lock:
            if self._registered.get(ptr) == nbytes:
                return
            # Live buffers never overlap: a registration overlapping this range belongs to memory that was freed
            # without being unregistered (a store closed by its user), and Mooncake refuses the overlap (-7).
            for old, size in list(self._registered.items()):
                if old < ptr + nbytes and ptr < old + size:
                    self._engine.unregister_memory(old)
                    del self._registered[old]
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


def engine(host: str, protocol: str, timeout_s: float, ports: tuple[int, int] | None = None) -> TransferEngineHandle:
    """The process's engine, created on first use; ``ports``: the inclusive range its listeners may take."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            _ENGINE = TransferEngineHandle(host, protocol, timeout_s, ports)
        elif _ENGINE.protocol != protocol or _ENGINE.host != host:
            raise TransferEngineError(
                f"this process's TransferEngine runs {_ENGINE.protocol} on {_ENGINE.host}; "
                f"{protocol} on {host} was asked for"
            )
        return _ENGINE
