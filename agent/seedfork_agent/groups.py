"""Point-to-point broadcast groups built the way SGLang's R-Fork builds them.

SGLang creates its weight-send group with a private torch helper over a
``tcp://`` rendezvous whose store is wrapped in ``PrefixStore(group_name, ...)``
(docs/sglang.md). Building ours the same way makes every store key match
byte for byte (SGLang's wire shape; stock SGLang peers are still refused, docs/sglang.md).
Groups are created outside the default process group, so one process can hold
several at once (one per client, or a cohort) and make new ones after a failure.

Listeners: rank 0's store listens on its own pod IP and the group's port, on a socket
bound here (torch's store would bind all addresses); it closes when the group is
destroyed. Over gloo each member's pair listener binds the member's pod IP (torch's
default device binds whatever the host name resolves to); its port is the kernel's
choice, as gloo and NCCL take no port setting.

Every wait of a group creation asks an ``abort`` callback between short slices (``AbortableStore``), so a
member that died, a group that expired or a newer assignment ends it within a second, on every rank: an
aborted rank 0 drops its store, which fails the members' own store waits at once.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore
from torch.distributed.distributed_c10d import _new_process_group_helper, _world

from .abortable import AbortableStore, JoinAborted

_LOCK = threading.Lock()  # torch's group registry is process-global
# gloo with a device bound to a given address: torch's own "gloo" takes no device for a new group.
_GLOO_AT = "seedfork_gloo"


def _gloo_at(opts, host: str):
    gloo = dist.ProcessGroupGloo
    options = gloo._Options()
    options._timeout = opts.timeout
    options._devices = [gloo.create_device(hostname=host)]
    backend = gloo(opts.store, opts.group_rank, opts.group_size, options)
    backend.options.global_ranks_in_group = opts.global_ranks_in_group
    backend.options.group_name = opts.group_id
    return backend


dist.Backend.register_backend(_GLOO_AT, _gloo_at, extended_api=True, devices=["cpu"])


def group_name(base: str, port: int, rank: int = 0) -> str:
    """SGLang's per-rank name: ``send_weights_<id>_<port>_<tp_rank>``."""
    return f"{base}_{port}_{rank}"


def local_backend(requested: str, device: torch.device) -> str:
    """NCCL needs GPUs; the same protocol runs over gloo when the weights live in host memory."""
    if device.type == "cpu":
        return "gloo"
    if requested not in ("nccl", "gloo"):
        raise ValueError(f"unsupported group backend {requested!r}")
    return "nccl"


__all__ = ["JoinAborted", "destroy_group", "init_group"]


def _wait_listening(host: str, port: int, timeout_s: float, abort: Callable[[], str | None]) -> None:
    """Wait until rank 0's store listens, asking ``abort`` between short tries: a seed that died or refused
    the group then costs a second, not the whole rendezvous timeout. (Plain connects: torch's own store
    client logs a stack trace for every failed try.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        reason = abort()
        if reason:
            raise JoinAborted(reason)
        left = deadline - time.monotonic()
        if left <= 0:
            return  # the store's own connect reports the timeout
        if listening(host, port, min(1.0, left)):
            return
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def listening(host: str, port: int, timeout_s: float) -> bool:
    """Whether ``host:port`` accepts a connection. The probe closes with a reset: one left in TIME_WAIT would
    hold its local port, which a group store on this host may want to bind next; a store takes it for a
    client that left."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return True
    except OSError:
        return False


def master_store(host: str, port: int, world_size: int, timeout: timedelta) -> TCPStore:
    """Rank 0's store, listening on ``host:port`` only. It does not wait for the members: the group's own
    (abortable) waits do."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # The last group on this port may have left connections in TIME_WAIT: they must not block this one.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(64, world_size))
        fd = os.dup(sock.fileno())  # the store's server owns (and closes) this one
        inode = os.fstat(fd).st_ino
        try:
            return TCPStore(
                host, port, world_size, True, timeout, wait_for_workers=False, master_listen_fd=fd, use_libuv=True
            )
        except BaseException:
            if _inode_of(fd) == inode:  # the failed store left its descriptor open: close it, or the port stays open
                os.close(fd)
            raise
    finally:
        sock.close()


def _inode_of(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def init_group(
    backend: str,
    host: str,
    port: int,
    world_size: int,
    rank: int,
    name: str,
    timeout_s: float,
    device: torch.device | None = None,
    abort: Callable[[], str | None] | None = None,
    local_host: str | None = None,
) -> dist.ProcessGroup:
    """Rendezvous at ``tcp://host:port`` (rank 0 hosts the store on ``host``) and build the group; barrier once.

    ``local_host``: this member's own pod IP, which its gloo pair listener binds (rank 0: ``host``).
    ``abort`` is asked while connecting and between the slices of every store wait; a reason ends the
    join with ``JoinAborted`` (on rank 0 the store is then closed, which ends the members' waits too)."""
    timeout = timedelta(seconds=timeout_s)
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # called from worker threads
    if rank > 0 and abort is not None:
        started = time.monotonic()
        _wait_listening(host, port, timeout_s, abort)
        timeout = timedelta(seconds=max(1.0, timeout_s - (time.monotonic() - started)))
    if rank == 0:
        # Not waiting for the members here: the store's constructor blocks where no abort can reach it; their
        # arrival is waited for below, in the group's own (abortable) waits.
        raw = master_store(host, port, world_size, timeout)
    else:
        raw = TCPStore(host, port, world_size, False, timeout, use_libuv=True)
    raw.set_timeout(timeout)
    store = AbortableStore(raw, abort or _never, timeout_s)
    del raw  # the wrapper holds the only reference: closing it (or destroying the group) closes rank 0's listener
    prefixed = PrefixStore(name, store)
    device_id = device if device is not None and device.type == "cuda" else None
    local = host if rank == 0 else local_host
    options = None
    if backend == "gloo" and local:
        backend, options = _GLOO_AT, local
    try:
        # Not under _LOCK: building waits for the other ranks, and other groups must be built meanwhile.
        pg, _ = _new_process_group_helper(
            world_size, rank, [], backend, prefixed, group_name=name, timeout=timeout, device_id=device_id,
            backend_options=options,
        )  # fmt: skip
    except BaseException:
        store.close()
        raise
    with _LOCK:
        _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    del prefixed
    try:
        dist.barrier(group=pg, device_ids=[device.index] if device_id is not None else None)
    except BaseException:
        destroy_group(pg)
        store.close()
        raise
    return pg


def _never() -> str | None:
    return None


def destroy_group(pg: dist.ProcessGroup | None) -> None:
    if pg is None:
        return
    with _LOCK:
        try:
            dist.destroy_process_group(pg)
        except Exception:
            pass  # a group broken by a dead peer may refuse a clean shutdown; it is dropped either way


def broadcast_tensors(
    pg: dist.ProcessGroup,
    tensors: list[torch.Tensor],
    on_bytes: Callable[[int], None] | None = None,
    bandwidth_limit_bps: float | None = None,
) -> int:
    """Broadcast from rank 0, one call per tensor in order (R-Fork's data phase). Returns bytes moved."""
    moved = 0
    start = time.monotonic()
    if tensors and tensors[0].is_cuda:
        torch.cuda.set_device(tensors[0].device)  # called from worker threads
    for t in tensors:
        if t.numel() == 0:
            continue
        dist.broadcast(t, src=0, group=pg)
        n = t.numel() * t.element_size()
        moved += n
        if on_bytes:
            on_bytes(n)
        if bandwidth_limit_bps:
            ahead = moved / bandwidth_limit_bps - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    if tensors and tensors[0].is_cuda:
        torch.cuda.synchronize(tensors[0].device)
    return moved
