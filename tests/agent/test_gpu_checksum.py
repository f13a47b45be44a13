"""GPU: the one-pass checksum kernel gives the torch definition's digits and is the path the store uses."""

from __future__ import annotations

import pytest
import torch

from seedfork_agent import checksum as ck
from seedfork_agent.store import layout, manifest_checksums

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_kernel_matches_torch_on_a_layout_with_awkward_sizes():
    shapes = [(4096, 4096), (7,), (1, 3), (128256, 4096), (5,), (14336, 4096), (1,), (0,)]
    specs = [(f"t{i}", "bfloat16" if i % 2 == 0 else "int8", s) for i, s in enumerate(shapes)]
    man = layout(specs, "fp")
    buf = torch.randint(0, 256, (man.total_bytes,), dtype=torch.uint8, device="cuda")
    got = manifest_checksums(buf, man)
    assert ck._kernel_proven, "the store did not take the kernel path on a GPU"
    want = {t.name: ck.checksum(buf[t.offset : t.offset + t.nbytes]) for t in man.tensors}
    assert got == want
    # One flipped bit in the largest tensor changes its digits and no other's.
    big = max(man.tensors, key=lambda t: t.nbytes)
    buf[big.offset + big.nbytes // 3] ^= 1
    again = manifest_checksums(buf, man)
    assert [n for n in want if again[n] != want[n]] == [big.name]


FALLBACK = """
import torch
from seedfork_agent import checksum as ck
buf = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
spans = [(0, 1000), (4096, 77777), (262144, 5)]
got = ck.checksums(buf, spans)
print(got == [ck.checksum(buf[o:o + n]) for o, n in spans], ck._kernel is False)
"""


def test_without_a_c_compiler_the_gpu_still_verifies_with_torch(tmp_path):
    """An image without gcc: Triton cannot build its launcher, the kernel is dropped, digits stay right."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]
    assert "checksum kernel unavailable" in out.stderr


def test_a_pull_never_waits_for_another_threads_kernel_compile(monkeypatch):
    """While a warm-up compiles the kernel in another thread, checksums use torch's reductions (same digits)."""
    buf = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    spans = [(0, 1000), (4096, 70001)]
    want = [ck.checksum(buf[o : o + n]) for o, n in spans]

    def must_not_run(*_):
        raise AssertionError("the kernel was launched while another thread compiled it")

    monkeypatch.setattr(ck, "_kernel_proven", False)
    monkeypatch.setattr(ck, "_warming", -1)  # some other thread
    monkeypatch.setattr(ck, "block_checksums", must_not_run)
    assert ck.checksums(buf, spans) == want
    monkeypatch.undo()  # no warm-up running: the kernel path again
    assert ck.checksums(buf, spans) == want
