"""The engine-cache archive: what a new pod accepts from its seed, and everything it refuses."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from seedfork_agent.engine_cache import MANIFEST_NAME, CacheKey, EngineCacheError, device_kind, pack, unpack

KEY = CacheKey(fingerprint="fp-1", engine="vllm", engine_version="0.32.0", device="cpu:x86_64:avx2")


@pytest.fixture
def cache(tmp_path) -> Path:
    root = tmp_path / "seed-cache"
    (root / "inductor" / "ab").mkdir(parents=True)
    (root / "inductor" / "ab" / "kernel.so").write_bytes(bytes(range(256)) * 40)
    (root / "inductor" / "ab" / "kernel.cpp").write_text("extern \"C\" void kernel() {}\n")
    (root / "vllm" / "torch_compile_cache").mkdir(parents=True)
    (root / "vllm" / "torch_compile_cache" / "model").write_bytes(b"\x00graph" * 100)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _archive(manifest: dict, members: list[tuple[str, bytes]], kind: bytes = tarfile.REGTYPE) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [(MANIFEST_NAME, json.dumps(manifest).encode()), *members]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name != MANIFEST_NAME and kind != tarfile.REGTYPE:
                info.type, info.size, info.linkname = kind, 0, "/etc/passwd"
                tar.addfile(info)
            else:
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _entry(path: str, data: bytes) -> dict:
    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_packed_cache_unpacks_to_the_same_files(cache, tmp_path):
    dest = tmp_path / "new-pod-cache"
    got = unpack(pack(cache, KEY), dest, KEY)
    assert _tree(dest) == _tree(cache)
    assert got.files == 3 and got.bytes == sum(len(b) for b in _tree(cache).values())


def test_a_cache_of_another_key_is_refused_and_leaves_nothing(cache, tmp_path):
    dest = tmp_path / "new-pod-cache"
    for other in (
        CacheKey("fp-2", "vllm", "0.32.0", KEY.device),
        CacheKey("fp-1", "vllm", "0.33.0", KEY.device),
        CacheKey("fp-1", "vllm", "0.32.0", "cpu:x86_64:avx2+avx512f"),
    ):
        with pytest.raises(EngineCacheError, match="key"):
            unpack(pack(cache, KEY), dest, other)
    assert _tree(dest) == {}


def test_a_corrupted_file_is_refused_and_nothing_lands(cache, tmp_path):
    data = bytearray(pack(cache, KEY))
    at = bytes(data).index(bytes(range(256)))  # inside kernel.so's bytes
    data[at + 7] ^= 0x01
    dest = tmp_path / "new-pod-cache"
    with pytest.raises(EngineCacheError, match="differs from its checksum"):
        unpack(bytes(data), dest, KEY)
    assert _tree(dest) == {}  # not even the files that came before the corrupted one


def test_a_cache_above_the_limit_is_refused_on_both_sides(cache, tmp_path):
    total = sum(len(b) for b in _tree(cache).values())
    with pytest.raises(EngineCacheError, match="larger than the limit"):
        pack(cache, KEY, max_bytes=total - 1)
    with pytest.raises(EngineCacheError, match="larger than the limit"):
        unpack(pack(cache, KEY), tmp_path / "dest", KEY, max_bytes=total - 1)


@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "a/../../escaped", "a//b", "./a"])
def test_a_path_outside_the_cache_is_refused(tmp_path, name):
    data = b"owned"
    archive = _archive({"format": 1, "key": KEY.to_dict(), "files": [_entry(name, data)]}, [(name, data)])
    dest = tmp_path / "sub" / "dest"
    with pytest.raises(EngineCacheError, match="path"):
        unpack(archive, dest, KEY)
    assert not (tmp_path / "sub" / "escaped").exists() and not (tmp_path / "escaped").exists()
    assert _tree(dest) == {}


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_a_link_in_the_archive_is_refused(tmp_path, kind):
    manifest = {"format": 1, "key": KEY.to_dict(), "files": [_entry("inductor/x.so", b"")]}
    with pytest.raises(EngineCacheError, match="link"):
        unpack(_archive(manifest, [("inductor/x.so", b"")], kind), tmp_path / "dest", KEY)


def test_a_file_the_manifest_does_not_name_or_a_missing_one_is_refused(tmp_path):
    manifest = {"format": 1, "key": KEY.to_dict(), "files": [_entry("a", b"1")]}
    with pytest.raises(EngineCacheError, match="does not"):
        unpack(_archive(manifest, [("a", b"1"), ("b", b"2")]), tmp_path / "d1", KEY)
    manifest = {"format": 1, "key": KEY.to_dict(), "files": [_entry("a", b"1"), _entry("b", b"2")]}
    with pytest.raises(EngineCacheError, match="lacks"):
        unpack(_archive(manifest, [("a", b"1")]), tmp_path / "d2", KEY)
    assert _tree(tmp_path) == {}


def test_an_archive_without_its_manifest_first_is_refused(cache, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(cache / "inductor" / "ab" / "kernel.so", arcname="kernel.so")
    with pytest.raises(EngineCacheError, match="manifest"):
        unpack(buf.getvalue(), tmp_path / "dest", KEY)
    with pytest.raises(EngineCacheError, match=r"unreadable|manifest"):
        unpack(b"not a tar at all" * 100, tmp_path / "dest", KEY)


def test_links_in_the_seed_cache_are_never_packed(cache, tmp_path):
    (cache / "inductor" / "passwd").symlink_to("/etc/passwd")
    dest = tmp_path / "dest"
    unpack(pack(cache, KEY), dest, KEY)
    assert "inductor/passwd" not in _tree(dest)


@pytest.mark.parametrize(
    ("engine", "local", "portable"),
    [
        ("vllm", ["vllm/gpu_p2p_access_cache_for_0,1.json"], ["vllm/torch_compile_cache/model"]),
        (
            "sglang",
            ["sglang/gpu_p2p_access_cache_for_0,1.json", "sglang/model_streamer/3f2a/model.safetensors"],
            ["sglang/triton/ab/k.cubin", "sglang/deep_gemm/cache/kernel.so", "sglang/flashinfer/autotune/r.json"],
        ),
    ],
)
def test_what_holds_for_the_seeds_node_only_is_never_packed_nor_taken(tmp_path, engine, local, portable):
    key = CacheKey("fp-1", engine, "1.0", "cuda:sm_90")
    root = tmp_path / "seed-cache"
    for rel in [*local, *portable]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 3)
    dest = tmp_path / "new-pod-cache"
    got = unpack(pack(root, key), dest, key)
    assert sorted(_tree(dest)) == sorted(portable) and got.files == len(portable)

    # A seed whose agent packed them anyway (an older release): checked like the rest, never written here.
    files = [(rel, (root / rel).read_bytes()) for rel in [*local, *portable]]
    archive = _archive({"format": 1, "key": key.to_dict(), "files": [_entry(r, d) for r, d in files]}, files)
    dest = tmp_path / "from-an-older-seed"
    got = unpack(archive, dest, key)
    assert sorted(_tree(dest)) == sorted(portable) and got.files == len(portable)


def test_the_device_kind_names_the_cpu_instruction_set():
    kind = device_kind("cpu")
    assert kind.startswith("cpu:")
    flags = Path("/proc/cpuinfo").read_text()
    assert ("avx2" in kind.split(":")[-1].split("+")) == (" avx2" in flags)
