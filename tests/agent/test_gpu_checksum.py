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
