"""Point-to-point broadcast groups built the way SGLang's R-Fork builds them.

SGLang creates its weight-send group with a private torch helper over a
``tcp://`` rendezvous whose store is wrapped in ``PrefixStore(group_name, ...)``
(docs/sglang.md). Building ours the same way makes every store key match
byte for byte (SGLang's wire shape; stock SGLang peers are still refused, docs/sglang.md).
Groups are created outside the default process group, so one process can hold
several at once (one per client, or a cohort) and make new ones after a failure.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore
from torch.distributed.distributed_c10d import _new_process_group_helper, _world
from torch.distributed.rendezvous import rendezvous

_LOCK = threading.Lock()  # torch's group registry is process-global


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


class JoinAborted(RuntimeError):
    """A client gave up joining a group because ``abort`` gave a reason (e.g. the seed refused the group)."""


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
        try:
            with socket.create_connection((host, port), timeout=min(1.0, left)) as probe:
                # Close with a reset: a probe left in TIME_WAIT would hold its local port, which a group
                # store on this host may want to bind next.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
        except OSError:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


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
) -> dist.ProcessGroup:
    """Rendezvous at ``tcp://host:port`` (rank 0 hosts the store) and build the group; barrier once.

    ``abort`` (clients only) is asked while connecting; a reason ends the join with ``JoinAborted``."""
    timeout = timedelta(seconds=timeout_s)
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)  # called from worker threads
    if rank > 0 and abort is not None:
        started = time.monotonic()
        _wait_listening(host, port, timeout_s, abort)
        timeout = timedelta(seconds=max(1.0, timeout_s - (time.monotonic() - started)))
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    prefixed = PrefixStore(name, store)
    device_id = device if device is not None and device.type == "cuda" else None
    with _LOCK:
        pg, _ = _new_process_group_helper(
            world_size, rank, [], backend, prefixed, group_name=name, timeout=timeout, device_id=device_id
        )
        _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    try:
        dist.barrier(group=pg, device_ids=[device.index] if device_id is not None else None)
    except BaseException:
        destroy_group(pg)
        raise
    return pg


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
