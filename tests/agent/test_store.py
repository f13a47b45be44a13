"""Weight store, manifest and checksum: layout, loading, verification, sharing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seedfork_agent.checksum import checksum
from seedfork_agent.store import ALIGN, Manifest, WeightStore, attach, layout, remove_stale_shm

MASK = (1 << 64) - 1


def reference_checksum(data: bytes) -> str:
    """The definition in checksum.py, written the slow obvious way."""
    a = b = 0
    n = len(data) // 4
    for i in range(n):
        w = int.from_bytes(data[4 * i : 4 * i + 4], "little", signed=True)
        a += w
        b += w * (i + 1)
    for k in range(n * 4, len(data)):
        a += data[k]
        b += data[k] * (k + 1) * 0x9E3779B1
    return f"{a & MASK:016x}{b & MASK:016x}"


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=40000))
def test_checksum_matches_definition(data):
    assert checksum(
        torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    ) == reference_checksum(data)


def test_checksum_across_chunk_and_row_boundaries(monkeypatch):
    """Inputs larger than one step: each step's positions are shifted to the tensor's own."""
    from seedfork_agent import checksum as ck

    monkeypatch.setattr(ck, "_CHUNK_WORDS", 3 * ck._WIDTH + 5)  # steps that end mid-row
    data = torch.randint(0, 256, (4 * (7 * ck._WIDTH + 3) + 2,), dtype=torch.uint8, generator=torch.Generator())
    assert ck.checksum(data) == reference_checksum(bytes(data.tolist()))


KERNEL_CHECK = """
import torch
from seedfork_agent.checksum import _BLOCK_WORDS, block_checksums, checksum
B = 4 * _BLOCK_WORDS  # bytes one kernel program reads
size = 3 * B + 4096
buf = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
# Empty, tiny, with 1-3 tail bytes, exactly one block, one block and a word, several blocks, at the buffer end.
spans = [(0, 0), (256, 1), (512, 6), (1024, 7), (2048, B), (2048 + B, B + 4), (2048 + 2 * B + 256, B // 2 + 3),
         (size - 1280, 1280)]
got = block_checksums(buf, spans)
want = [checksum(buf[o:o + n]) for o, n in spans]
print(sum(g == w for g, w in zip(got, want)), len(want))
"""


def test_checksum_kernel_gives_the_same_digits(tmp_path):
    """The one-pass GPU kernel, run on the CPU by Triton's interpreter, agrees with the torch definition."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "agent")}
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["8", "8"]


def test_checksum_detects_flip_and_swap():
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, generator=g)
    base = checksum(data)
    flipped = data.clone()
    flipped[12345] ^= 0x10
    assert checksum(flipped) != base
    swapped = data.clone().view(torch.int32)
    swapped[[7, 9000]] = swapped[[9000, 7]]
    assert not torch.equal(swapped, data.view(torch.int32))
    assert checksum(swapped.view(torch.uint8)) != base
    byteswap = data.clone()
    byteswap[[100, 101]] = byteswap[[101, 100]]
    assert checksum(byteswap) != base or data[100] == data[101]
    assert checksum(torch.zeros_like(data)) != base


def test_layout_is_aligned_and_ordered():
    m = layout([("a", "bfloat16", (3, 5)), ("b", "float32", (7,)), ("c", "int8", (0,))], "fp")
    assert [t.name for t in m.tensors] == ["a", "b", "c"]
    assert all(t.offset % ALIGN == 0 for t in m.tensors)
    assert m.tensors[0].nbytes == 30 and m.tensors[1].nbytes == 28 and m.tensors[1].offset == ALIGN
    assert Manifest.from_dict(m.to_dict()) == m


def test_manifest_refuses_bad_layouts():
    m = layout([("a", "float32", (4,)), ("b", "float32", (4,))], "fp").to_dict()
    overlapping = {**m, "tensors": [m["tensors"][0], {**m["tensors"][1], "offset": 0}]}
    overlapping.pop("digest")
    with pytest.raises(ValueError, match="overlapping"):
        Manifest.from_dict(overlapping)
    wrong_size = {**m, "tensors": [{**m["tensors"][0], "nbytes": 3}, m["tensors"][1]]}
    wrong_size.pop("digest")
    with pytest.raises(ValueError, match="nbytes"):
        Manifest.from_dict(wrong_size)
    tampered = {**m, "tensors": [m["tensors"][0], {**m["tensors"][1], "checksum": "ff"}]}
    with pytest.raises(ValueError, match="digest"):
        Manifest.from_dict(tampered)
    with pytest.raises(ValueError, match="malformed"):
        Manifest.from_dict({"tensors": []})


def test_from_safetensors_roundtrip(weights_dir, weight_tensors):
    with WeightStore.from_safetensors(weights_dir, "fp1") as store:
        assert store.manifest.fingerprint == "fp1"
        assert {t.name for t in store.manifest.tensors} == set(weight_tensors)
        for name, t in weight_tensors.items():
            assert torch.equal(store.tensor(name), t), name
        assert store.verify(store.manifest) == []
        # One flipped byte in the shared buffer is caught for exactly that tensor.
        name = store.manifest.tensors[1].name
        store.raw(name)[5] ^= 1
        assert store.verify(store.manifest) == [name]
        path = store.attach_info()["path"]
    assert not __import__("os").path.exists(path), "close() must unlink the shared-memory file"


def test_attach_from_another_process_is_zero_copy(weights_dir):
    with WeightStore.from_safetensors(weights_dir, "fp1") as store:
        info = store.attach_info()
        assert info["kind"] == "shm" and info["nbytes"] == store.nbytes
        name = store.manifest.tensors[0].name
        code = (
            "import json,sys,torch\n"
            "from seedfork_agent.store import Manifest, attach\n"
            "d=json.load(sys.stdin)\n"
            "ts=attach(d['info'], Manifest.from_dict(d['manifest']))\n"
            f"t=ts[{name!r}]\n"
            "print(float(t.float().sum()))\n"
            "t.view(-1)[0]=42\n"
        )
        import json

        before = float(store.tensor(name).float().sum())
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps({"info": info, "manifest": store.manifest.to_dict()}),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert float(out.stdout.strip()) == before
        # The other process wrote through its mapping: same pages.
        assert float(store.tensor(name).view(-1)[0]) == 42
        assert attach(info, store.manifest)[name].data_ptr() != store.tensor(name).data_ptr()


def test_stale_store_files_of_dead_processes_are_removed(tmp_path):
    # A store created in a process that then dies without close() leaves its file behind.
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from seedfork_agent.store import WeightStore, layout\n"
        "s = WeightStore.empty(layout([('a', 'float32', (4,))], 'fp'), shm_dir=Path(sys.argv[1]))\n"
        "print(s.attach_info()['path'])\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    stale = Path(out.stdout.strip())
    assert stale.exists()
    with WeightStore.empty(layout([("a", "float32", (4,))], "fp"), shm_dir=tmp_path) as live:
        other = tmp_path / "unrelated-file"
        other.write_bytes(b"y")
        assert remove_stale_shm(tmp_path) == [stale]
        assert Path(live.attach_info()["path"]).exists() and other.exists()


def test_cpu_checksums_run_on_one_thread_and_restore_the_count(monkeypatch):
    """Memory-bound reductions on a busy node are far faster on one thread (see checksum._one_cpu_thread)."""
    from seedfork_agent import checksum as ck

    seen = []
    real = ck._chunk_sums
    monkeypatch.setattr(ck, "_chunk_sums", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        data = torch.arange(1 << 16, dtype=torch.int32).view(torch.uint8)
        assert ck.checksum(data) == reference_checksum(bytes(data.tolist()))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
