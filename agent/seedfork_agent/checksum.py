"""Checksums of raw bytes, computed where the bytes live (GPU or CPU).

A plain sum or xor misses swapped words; a cryptographic hash on the GPU needs a
custom kernel. This is a two-part position-weighted sum over 32-bit words, in
64-bit wrap-around arithmetic, so torch runs it as a few memory-bound element
ops on the device that holds the tensor:

    A = sum(w_i)            (any changed word changes A)
    B = sum(w_i * (i + 1))  (two differing words swapped change B)

Leftover bytes (nbytes % 4) are folded in with their own positions. The result
is the 32 hex digits of A and B. It guards against transport bugs (truncation,
misplaced slices, zeroed or flipped bytes), not against an adversary: the bearer
token and the fingerprint check keep foreign peers out.

``checksums`` does many byte ranges of one buffer at once. On a GPU with Triton it
is one kernel pass over all of them (per-block partial sums, combined per range
by a prefix sum) and one device-to-host copy; elsewhere it checksums range by range.
Both give the same digits: wrap-around integer sums do not depend on their order.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence

import torch

log = logging.getLogger("seedfork.checksum")

_WIDTH = 4096  # words per row: column weights stay small, rows weight the rest
_CHUNK_WORDS = 1 << 20  # 4 MiB of input per step: the CPU's widened int64 copy stays in cache (6x faster)
_MASK = (1 << 64) - 1


def checksum(data: torch.Tensor) -> str:
    """Checksum of a contiguous 1-D uint8 tensor (any device)."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("checksum takes a 1-D uint8 tensor")
    if data.is_cuda:
        return _checksum(data)
    with _one_cpu_thread():
        return _checksum(data)


@contextlib.contextmanager
def _one_cpu_thread():
    """Run CPU reductions on this thread alone. They are memory-bound: on a 2-core machine one thread
    checksummed 272 MB in 57 ms against 68 ms for two, and in 0.17 s against 0.9 s while other processes
    kept the cores busy (a parallel reduction waits for every thread of its team at each step): what a pod
    on a shared node sees. OpenMP keeps the count per calling thread: other threads keep theirs."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _checksum(data: torch.Tensor) -> str:
    nbytes = data.numel()
    nwords = nbytes // 4
    total_a = 0
    total_b = 0
    if nwords:
        words = data[: nwords * 4].view(torch.int32)
        cols = torch.arange(1, _WIDTH + 1, dtype=torch.int64, device=data.device)
        for start in range(0, nwords, _CHUNK_WORDS):
            a, b = _chunk_sums(words[start : start + _CHUNK_WORDS], cols)
            # The chunk's own positions start at 1; shift them to the global index.
            total_a = (total_a + a) & _MASK
            total_b = (total_b + b + start * a) & _MASK
    for k in range(nwords * 4, nbytes):  # at most 3 tail bytes
        value = int(data[k].item())
        total_a = (total_a + value) & _MASK
        total_b = (total_b + value * (k + 1) * 0x9E3779B1) & _MASK
    return f"{total_a:016x}{total_b:016x}"


def _chunk_sums(words: torch.Tensor, cols: torch.Tensor) -> tuple[int, int]:
    # Word (r, c) of a rows x W block sits at index r*W + c, so its weight r*W + c + 1 splits into a
    # column part and a row part: B = sum_c (c+1) * colsum[c] + W * sum_r r * rowsum[r]. Two reductions
    # that widen to int64 as they read (on GPU): no int64 copy of the data.
    n = words.numel()
    rows, rest = divmod(n, _WIDTH)
    a = torch.zeros((), dtype=torch.int64, device=words.device)
    b = torch.zeros((), dtype=torch.int64, device=words.device)
    if rows:
        block = words[: rows * _WIDTH].view(rows, _WIDTH)
        if not block.is_cuda:  # CPU reductions are faster over a widened copy than widening as they read
            block = block.to(torch.int64)
        row_sums = block.sum(dim=1, dtype=torch.int64)
        col_sums = block.sum(dim=0, dtype=torch.int64)
        row_index = torch.arange(rows, dtype=torch.int64, device=words.device)
        a = a + row_sums.sum()
        b = b + (col_sums * cols).sum() + (row_sums * row_index).sum() * _WIDTH
    if rest:
        tail = words[rows * _WIDTH :].to(torch.int64)
        a = a + tail.sum()
        b = b + (tail * (cols[:rest] + rows * _WIDTH)).sum()
    return int(a.item()) & _MASK, int(b.item()) & _MASK


def checksums(buffer: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[str]:
    """Checksums of the byte ranges ``(offset, nbytes)`` of a 1-D uint8 ``buffer``, in order."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("checksums takes a 1-D uint8 tensor")
    global _kernel, _kernel_proven
    # While another thread's warm-up compiles the kernel, verify with torch's reductions rather than wait:
    # a pod's first pull may land before the compile (about a second) is done.
    compiling = not _kernel_proven and _warming not in (None, threading.get_ident())
    if buffer.is_cuda and not compiling and _kernel_ready() and all(offset % _SPAN_ALIGN == 0 for offset, _ in spans):
        try:
            sums = block_checksums(buffer, spans)
            _kernel_proven = True
            return sums
        except Exception as err:
            if _kernel_proven:
                raise
            # Triton compiles at the first launch and needs a C compiler for that: an image without one
            # still verifies, with torch's reductions.
            log.warning("checksum kernel unavailable (%s: %s); using torch reductions", type(err).__name__, err)
            _kernel = False
    return [checksum(buffer[offset : offset + nbytes]) for offset, nbytes in spans]


def warm_up(device: torch.device | str) -> None:
    """Run ``checksums`` once on a small buffer of ``device``: a GPU's kernel compiles (or loads) here."""
    global _warming
    _warming = threading.get_ident()
    try:
        device = torch.device(device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # may run in a worker thread
        checksums(torch.zeros(4 * _SPAN_ALIGN, dtype=torch.uint8, device=device), [(0, 1000), (_SPAN_ALIGN * 3, 9)])
    except Exception as err:  # only a warm-up: the real call reports real errors
        log.warning("checksum warm-up failed: %s", err)
    finally:
        _warming = None


# ---- the one-pass kernel (GPU; also runs on CPU under TRITON_INTERPRET=1, which the tests use) ----
_SPAN_ALIGN = 256  # ranges start 64-word aligned (the store's layout), so loads can be vectorised
_LANES = 1024  # words one program reads per step
_STEPS = 256  # steps per program: 1 MiB of input. On H200: 128 KiB 0.7 TB/s, 256 KiB 1.2, 1 MiB 2.4 (16 GB)
_BLOCK_WORDS = _LANES * _STEPS
_WARPS = 8
_kernel = None
_kernel_proven = False
_warming: int | None = None  # the thread compiling the kernel in ``warm_up``


def _kernel_ready() -> bool:
    global _kernel
    if _kernel is None:
        try:
            _kernel = _build_kernel()
        except Exception:  # no Triton, or no compiler for it: the torch path is always there
            _kernel = False
    return _kernel is not False


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def block_sums(words, starts64, positions, counts, out, LANES: tl.constexpr, STEPS: tl.constexpr):
        # One program sums one block (up to LANES * STEPS words) of one range: A = sum(w) and
        # B = sum(w * (position in its range + 1)), both wrapping at 64 bits. The loop only adds: each lane
        # keeps a = sum_s w_s and c = sum_s (n - s) * w_s (a running sum of a), so sum_s s * w_s = n*a - c;
        # the multiplications by positions happen once per program, not once per word.
        pid = tl.program_id(0)
        start = tl.load(starts64 + pid) * 64  # a multiple of 64 words: the compiler may vectorise loads
        position = tl.load(positions + pid)
        count = tl.load(counts + pid)
        lanes = tl.arange(0, LANES)
        acc_a = tl.zeros([LANES], dtype=tl.int64)
        acc_c = tl.zeros([LANES], dtype=tl.int64)
        steps = tl.cdiv(count, LANES).to(tl.int32)
        if count == LANES * STEPS:  # a full block: no masks
            for step in range(STEPS):
                w = tl.load(words + start + step * LANES + lanes).to(tl.int64)
                acc_a += w
                acc_c += acc_a
        else:  # the last block of a range: only the steps it needs
            for step in range(steps):
                idx = step * LANES + lanes
                w = tl.load(words + start + idx, mask=idx < count, other=0).to(tl.int64)
                acc_a += w
                acc_c += acc_a
        total_a = tl.sum(acc_a, axis=0)
        by_step = steps.to(tl.int64) * total_a - tl.sum(acc_c, axis=0)  # sum of w * step
        by_lane = tl.sum(acc_a * lanes.to(tl.int64), axis=0)  # sum of w * lane
        tl.store(out + 2 * pid, total_a)
        tl.store(out + 2 * pid + 1, (position + 1) * total_a + LANES * by_step + by_lane)

    return block_sums


def block_checksums(buffer: torch.Tensor, spans: Sequence[tuple[int, int]]) -> list[str]:
    """``checksums`` through the one-pass kernel (ranges must start at multiples of 256 bytes)."""
    if not _kernel_ready():
        raise RuntimeError("the checksum kernel needs Triton")
    for offset, nbytes in spans:
        if offset % _SPAN_ALIGN or offset + nbytes > buffer.numel():
            raise ValueError(f"range ({offset}, {nbytes}) is unaligned or outside the buffer")
    words = buffer[: buffer.numel() // 4 * 4].view(torch.int32)
    nwords = [nbytes // 4 for _, nbytes in spans]
    nblocks = [-(-n // _BLOCK_WORDS) for n in nwords]
    total = sum(nblocks)
    sums = [[0, 0]] * len(spans)
    if total:
        # The block table (range start, position in the range, words) is built on the device from the
        # per-range numbers: a few small copies instead of one entry per block from the host.
        dev = buffer.device
        per_span = torch.tensor([[o // 4 for o, _ in spans], nwords, nblocks], dtype=torch.int64).to(dev)
        span_of = torch.repeat_interleave(torch.arange(len(spans), device=dev), per_span[2], output_size=total)
        bounds = torch.zeros(len(spans) + 1, dtype=torch.int64, device=dev)
        torch.cumsum(per_span[2], 0, out=bounds[1:])
        positions = (torch.arange(total, device=dev) - bounds[span_of]) * _BLOCK_WORDS
        starts64 = (per_span[0][span_of] + positions) // 64
        counts = torch.clamp(per_span[1][span_of] - positions, max=_BLOCK_WORDS)
        partial = torch.empty((total, 2), dtype=torch.int64, device=dev)
        _kernel[(total,)](words, starts64, positions, counts, partial, LANES=_LANES, STEPS=_STEPS, num_warps=_WARPS)
        # Prefix sums (wrapping) turn per-block partials into per-range totals.
        running = torch.cat([torch.zeros((1, 2), dtype=torch.int64, device=dev), partial.cumsum(0)])
        sums = (running[bounds[1:]] - running[bounds[:-1]]).tolist()  # the one copy back to the host
    out = []
    for (offset, nbytes), (a, b) in zip(spans, sums, strict=True):
        a, b = a & _MASK, b & _MASK
        tail = buffer[offset + nbytes // 4 * 4 : offset + nbytes].tolist() if nbytes % 4 else []
        for k, value in enumerate(tail, start=nbytes // 4 * 4):  # at most 3 bytes, as in ``checksum``
            a = (a + value) & _MASK
            b = (b + value * (k + 1) * 0x9E3779B1) & _MASK
        out.append(f"{a:016x}{b:016x}")
    return out
