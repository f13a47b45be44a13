"""The checkpoint-engine IPC handoff: named tensors, in buckets, through one shared buffer over ZMQ REQ/REP.

This is the wire protocol MoonshotAI checkpoint-engine speaks to SGLang (``POST /update_weights_from_ipc``,
e.g. an SGLang started with ``--load-format dummy --checkpoint-engine-wait-weights-before-ready``). vLLM
does not get its weights this way: its receiving side needs a worker extension and dev-mode routes that
change weights without a token, so seedfork's vLLM pods load through ``vllm_loader`` instead.

1. The producer binds a REQ socket at ``ipc://@checkpoint-engine-{device_uuid}-{counter}.sock`` (an
   abstract Unix socket) and asks the engine over HTTP to connect a REP socket to it.
2. First message: the buffer handle, a pickled ``(rebuild_fn, args)`` pair (``reduce_tensor`` of a
   uint8 buffer on GPU; on CPU a file in /dev/shm that the engine maps). The engine replies ``b""``.
3. Per bucket: a list of ``{name, dtype, shape, offset}``; the engine slices views of the buffer,
   loads them, and replies ``b""`` or the error text.
4. Teardown: a first ``None`` releases the buffer, a second ``None`` runs the post-load hook
   (checkpoint-engine 0.4.2). Older releases, among them 0.1.2, which SGLang's ``checkpoint-engine``
   extra pins, run the hook on the first ``None`` and leave; the producer then
   learns the teardown ended from the engine's answer to its update request (``handoff_over_http``).
   An exception object instead of a bucket aborts the update.

The producer side runs in the agent; the receiver side runs in the reference engine. The tests run the
producer against checkpoint-engine's own receivers as well (0.4.2; 0.1.2 behind SGLang's route).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

SHM_DIR = Path("/dev/shm")
_counter = itertools.count(os.getpid() * 1000)  # process-unique, so concurrent producers never share a path


def device_uuid(device: torch.device | str = "cpu") -> str:
    """The key engines look themselves up by: ``GPU-<uuid>`` as nvidia-smi prints it, as SGLang and
    checkpoint-engine use; on CPU a stable per-host key, since producer and engine share the host."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    return f"CPU-{uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname())}"


def socket_path(device: str) -> str:
    return f"ipc://@checkpoint-engine-{device}-{next(_counter)}.sock"


# ---- the shared buffer -----------------------------------------------------------------------


def rebuild_shm_buffer(path: str, nbytes: int) -> torch.Tensor:
    """Map a /dev/shm file as a uint8 tensor (shared, no copy). Module level so a handle can name it."""
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


@dataclass
class SharedBuffer:
    tensor: torch.Tensor
    handle: tuple  # (rebuild_fn, args), picklable
    path: Path | None = None

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def make_buffer(nbytes: int, device: torch.device | str = "cpu") -> SharedBuffer:
    device = torch.device(device)
    if device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return SharedBuffer(tensor, reduce_tensor(tensor))
    path = SHM_DIR / f"seedfork-ipc-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return SharedBuffer(rebuild_shm_buffer(str(path), nbytes), (rebuild_shm_buffer, (str(path), nbytes)), path)


def open_handle(handle: tuple, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rebuild the producer's buffer in this process, on this process's own device index."""
    func, args = handle
    if getattr(func, "__name__", "") == "rebuild_cuda_tensor":
        args = list(args)
        args[6] = torch.device(device).index or 0  # the device index, as checkpoint-engine's worker sets it
    buffer = func(*args)
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("IPC buffer must be a flat uint8 tensor")
    return buffer


# ---- buckets -----------------------------------------------------------------------------------

ALIGN = 256  # keep every tensor's offset aligned for any dtype and for vectorised copies


def plan_buckets(tensors: Mapping[str, torch.Tensor], bucket_bytes: int) -> list[list[dict]]:
    """Group tensors, in order, into buckets of at most ``bucket_bytes``; each meta has name/dtype/shape/offset."""
    buckets: list[list[dict]] = []
    current: list[dict] = []
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if nbytes > bucket_bytes:
            raise ValueError(f"{name} ({nbytes} bytes) does not fit a {bucket_bytes}-byte bucket")
        if current and offset + nbytes > bucket_bytes:
            buckets.append(current)
            current, offset = [], 0
        current.append({"name": name, "dtype": t.dtype, "shape": tuple(t.shape), "offset": offset})
        offset += -(-nbytes // ALIGN) * ALIGN
    if current:
        buckets.append(current)
    return buckets


def views(buffer: torch.Tensor, metas: Iterable[dict]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for m in metas:
        dtype, shape = m["dtype"], torch.Size(m["shape"])
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        start = int(m["offset"])
        if start < 0 or start + nbytes > buffer.numel():
            raise ValueError(f"{m['name']}: bytes [{start}, {start + nbytes}) lie outside the buffer")
        out.append((m["name"], buffer[start : start + nbytes].view(dtype).view(shape)))
    return out


# ---- producer (agent side) ---------------------------------------------------------------------


class HandoffError(RuntimeError):
    pass


class _RequestEnded(Exception):
    """Inside ``send_weights``: the engine answered its update request while the producer waited."""


def send_weights(
    sock_path: str,
    tensors: Mapping[str, torch.Tensor],
    bucket_bytes: int,
    device: torch.device | str = "cpu",
    timeout_s: float = 300.0,
    ctx: zmq.Context | None = None,
    bound: threading.Event | None = None,
    request_ended: threading.Event | None = None,
) -> int:
    """Stream ``tensors`` to one engine worker connected at ``sock_path``; returns the bytes sent.

    Blocks until the engine acknowledged both teardown messages, or acknowledged the first and
    ``request_ended`` is set: the engine answered its update request, so its worker ended on the first
    ``None`` (an older checkpoint-engine); the caller judges that answer. Raises ``HandoffError`` with the
    engine's error text if a bucket fails (after telling the engine to abort), on timeout, or as soon as
    ``request_ended`` is set before the teardown (e.g. the engine's HTTP trigger failed, so no worker will
    ever connect).
    """
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    largest = max((t.numel() * t.element_size() for t in tensors.values()), default=0)
    bucket_bytes = max(bucket_bytes, -(-largest // ALIGN) * ALIGN)
    buf = make_buffer(bucket_bytes, device)
    sent = 0

    def wait(event: int) -> None:
        deadline = time.monotonic() + timeout_s
        while not sock.poll(100, event):
            if request_ended is not None and request_ended.is_set():
                raise _RequestEnded
            if time.monotonic() > deadline:
                raise HandoffError(f"engine did not answer within {timeout_s}s")

    def ask(payload: object) -> None:
        wait(zmq.POLLOUT)  # a REQ socket can send only once a worker connected
        sock.send_pyobj(payload)
        wait(zmq.POLLIN)
        reply = sock.recv()
        if reply != b"":
            raise HandoffError(f"engine failed: {reply.decode(errors='replace')}")

    try:
        sock.bind(sock_path)
        if bound is not None:
            bound.set()
        ask(buf.handle)
        for metas in plan_buckets(tensors, bucket_bytes):
            for name, view in views(buf.tensor, metas):
                view.copy_(tensors[name])
                sent += view.numel() * view.element_size()
            if buf.tensor.is_cuda:
                torch.cuda.synchronize(buf.tensor.device)
            try:
                ask(metas)
            except HandoffError as e:
                try:  # let the worker leave its loop instead of waiting forever
                    sock.send_pyobj(RuntimeError(str(e)), zmq.NOBLOCK)
                    if sock.poll(int(timeout_s * 1000), zmq.POLLIN):
                        sock.recv()
                except zmq.ZMQError:
                    pass
                raise
        ask(None)  # release the buffer (0.1.2: the post-load hook, and the worker leaves)
        try:
            ask(None)  # post-load hook
        except _RequestEnded:
            pass  # nobody is left to answer: the request's answer tells how the update went
        return sent
    except _RequestEnded:
        raise HandoffError("the engine's update request ended before the handoff did") from None
    finally:
        sock.close()
        buf.close()


def sglang_update_body(handles: Mapping[str, str]) -> dict:
    """SGLang: ``POST /update_weights_from_ipc`` body (``UpdateWeightsFromIPCReqInput``)."""
    return {"zmq_handles": dict(handles), "flush_cache": True, "weight_version": None, "torch_empty_cache": False}


def handoff_over_http(
    engine_url: str,
    flavor: str,
    tensors: Mapping[str, torch.Tensor],
    bucket_bytes: int = 64 << 20,
    device: torch.device | str = "cpu",
    token: str | None = None,
    timeout_s: float = 300.0,
) -> int:
    """Hand ``tensors`` to the engine at ``engine_url``; ``flavor`` is ``sglang``.

    The HTTP request returns only after the engine's worker finished, so it runs in a thread
    while this thread drives the ZMQ socket.
    """
    import httpx

    if flavor != "sglang":
        raise ValueError(f"unknown engine flavor {flavor!r}")
    dev = device_uuid(device)
    path = socket_path(dev)
    handles = {dev: path}
    url, body = f"{engine_url}/update_weights_from_ipc", sglang_update_body(handles)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    bound, done = threading.Event(), threading.Event()
    result: dict = {}

    def request() -> None:
        bound.wait(timeout_s)
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=timeout_s)
            result["status"], result["text"] = r.status_code, r.text
        except Exception as e:  # surfaced below
            result["error"] = repr(e)
        finally:
            done.set()

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    failure: HandoffError | None = None
    try:
        sent = send_weights(path, tensors, bucket_bytes, device, timeout_s, bound=bound, request_ended=done)
    except HandoffError as e:
        failure = e
    finally:
        bound.set()
        thread.join(timeout_s)
    # The engine's answer explains a failure best (401, its own error text); the socket's comes next.
    if "error" in result:
        raise HandoffError(f"{url}: {result['error']}") from failure
    if result.get("status") != 200:
        raise HandoffError(f"{url}: HTTP {result.get('status')}: {result.get('text', '')[:500]}") from failure
    if failure is not None:
        raise failure
    return sent


# ---- receiver (engine side) --------------------------------------------------------------------


def receive_weights(
    sock_path: str,
    load: Callable[[list[tuple[str, torch.Tensor]]], None],
    post_hook: Callable[[], None] | None = None,
    device: torch.device | str = "cpu",
    timeout_s: float = 300.0,
    ctx: zmq.Context | None = None,
) -> None:
    """The engine worker's loop: connect REP, map the buffer, ``load`` each bucket's views, run ``post_hook``.

    ``load`` must copy what it keeps: the buffer is reused for the next bucket. Raises if the producer
    aborts, so the caller never marks half-loaded weights as ready.
    """
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.connect(sock_path)
    buffer: torch.Tensor | None = None
    nones = 0
    try:
        while True:
            try:
                payload = sock.recv_pyobj()
            except zmq.Again as e:
                raise HandoffError(f"producer sent nothing for {timeout_s}s") from e
            if payload is None:
                nones += 1
                if nones == 1:
                    buffer = None  # release the mapping before the post hook, as the producer expects
                elif post_hook is not None:
                    try:
                        post_hook()
                    except Exception:
                        sock.send(traceback.format_exc().encode())
                        raise
                sock.send(b"")
                if nones == 2:
                    return
            elif isinstance(payload, BaseException):
                sock.send(b"")
                raise HandoffError(f"producer aborted the update: {payload}")
            elif isinstance(payload, tuple):
                buffer = open_handle(payload, device)
                sock.send(b"")
            elif isinstance(payload, list):
                try:
                    if buffer is None:
                        raise HandoffError("bucket metas arrived before the buffer handle")
                    load(views(buffer, payload))
                    if buffer.is_cuda:
                        torch.cuda.synchronize(buffer.device)
                except Exception:
                    sock.send(traceback.format_exc().encode())
                    continue
                sock.send(b"")
            else:
                sock.send(f"unexpected payload {type(payload).__name__}".encode())
    finally:
        sock.close()
