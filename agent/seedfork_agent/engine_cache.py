"""An engine's compile and JIT caches, moved from a seed to a new pod before the new pod's engine compiles.

Real engines spend most of a scale-out compiling (vLLM's torch.compile and Inductor's generated C++ or
Triton kernels), not loading weights. A seed's engine has done that work already; its agent packs the
engine's cache directory into one archive: a tar whose first member is a manifest naming the cache's
``CacheKey`` and every file with its size and SHA-256, then the files. A new pod's agent fetches the
archive from its seed with the set's token, refuses it unless the key equals its own and every byte
matches the manifest, and only then moves the files into its own (empty) cache directory.

A cache is an optimisation, never a condition: every refusal here raises ``EngineCacheError`` and the
caller starts the engine without it (it compiles, as it would have anyway).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import platform
import shutil
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import httpx

from seedfork_api.contract import ENGINE_CACHE_NODE_LOCAL, PodEnv

ROUTE = "/v1/engine-cache"  # where a seed's agent serves its archive (engine_cache_http)
MANIFEST_NAME = "seedfork-engine-cache.json"
FORMAT = 1
DEFAULT_MAX_BYTES = 1 << 30  # a compile cache of a large model is hundreds of MB; above this, compile instead
_MANIFEST_MAX_BYTES = 16 << 20
_STAGING_PREFIX = ".seedfork-incoming-"
# CPU features that decide which instructions generated C++ kernels may use: a kernel built with AVX-512
# or AMX crashes on a CPU without them, so two CPUs share a cache only when these flags agree.
_CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_tile", "sve")


class EngineCacheError(RuntimeError):
    """The cache cannot be used (missing, mismatched, corrupted, too large); the engine compiles instead."""


@dataclass(frozen=True)
class CacheKey:
    """What makes an engine cache valid elsewhere: the same weights and engine configuration (the set's
    identity fingerprint, which covers model, dtype, engine version, tp and pp), the same engine build,
    and the same device kind (GPU compute capability, or CPU architecture and instruction set)."""

    fingerprint: str
    engine: str
    engine_version: str
    device: str

    @classmethod
    def of_pod(cls, env: PodEnv, device: str) -> CacheKey:
        return cls(env.fingerprint, env.engine, env.engine_version, device_kind(device))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def device_kind(device: str) -> str:
    """``cuda:sm_90`` for a GPU, ``cpu:x86_64:avx2+avx512f+...`` for a CPU."""
    if device.startswith("cuda"):
        import torch

        # Reads the device's properties without creating a CUDA context, which would take ~600 MiB from the
        # engine beside the agent (checked on an H200 with nvidia-smi's compute apps, torch 2.11).
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        return f"cuda:sm_{major}{minor}"
    return f"cpu:{platform.machine()}:{'+'.join(_cpu_flags()) or 'baseline'}"


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            have = set(value.split())
            return [f for f in _CPU_ISA_FLAGS if f in have]
    return []


@dataclass(frozen=True)
class Unpacked:
    files: int
    bytes: int


def _node_local(rel: str, engine: str) -> bool:
    """Whether ``engine`` keeps the file at ``rel`` for its own node only (``contract.ENGINE_CACHE_NODE_LOCAL``)."""
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in ENGINE_CACHE_NODE_LOCAL.get(engine, ()))


def _files(root: Path, engine: str) -> list[tuple[str, Path]]:
    """Regular files under ``root`` by relative POSIX path; links, special files and what ``engine`` keeps
    for its own node only are never packed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(_STAGING_PREFIX))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not path.is_file() or _node_local(rel, engine):
                continue
            out.append((rel, path))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(root: str | Path, key: CacheKey, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The archive of ``root``: manifest first, then every regular file but what ``key.engine`` keeps for its
    own node only. Raises when the files together exceed ``max_bytes``
    (a cache that large is not worth holding in memory to send)."""
    root = Path(root)
    if not root.is_dir():
        raise EngineCacheError(f"no engine cache at {root}")
    entries, total = [], 0
    for rel, path in _files(root, key.engine):
        size = path.stat().st_size
        total += size
        if total > max_bytes:
            raise EngineCacheError(f"engine cache at {root} is larger than the limit of {max_bytes} bytes")
        entries.append({"path": rel, "size": size, "sha256": _sha256(path)})
    if not entries:
        raise EngineCacheError(f"engine cache at {root} is empty")
    manifest = json.dumps({"format": FORMAT, "key": key.to_dict(), "files": entries}, sort_keys=True).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, MANIFEST_NAME, manifest)
        for entry in entries:
            data = (root / entry["path"]).read_bytes()
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise EngineCacheError(f"engine cache file {entry['path']} changed while it was packed")
            _add(tar, entry["path"], data)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _safe_relpath(name: object) -> str:
    """A relative path that stays inside the destination: no absolute path, no ``..``, no empty parts."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise EngineCacheError(f"engine cache archive names a bad path: {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise EngineCacheError(f"engine cache archive names a path outside the cache: {name!r}")
    if p.parts[0].startswith(_STAGING_PREFIX) or name == MANIFEST_NAME:
        raise EngineCacheError(f"engine cache archive names a reserved path: {name!r}")
    return p.as_posix()


def _read_manifest(tar: tarfile.TarFile, expected: CacheKey, max_bytes: int) -> dict[str, dict]:
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME or not first.isreg() or first.size > _MANIFEST_MAX_BYTES:
        raise EngineCacheError("engine cache archive does not start with its manifest")
    try:
        manifest = json.loads(tar.extractfile(first).read())
    except ValueError as e:
        raise EngineCacheError(f"engine cache manifest is not JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineCacheError(f"engine cache manifest has an unknown format: {manifest.get('format')!r}")
    if manifest.get("key") != expected.to_dict():
        raise EngineCacheError(f"engine cache key {manifest.get('key')} is not this pod's {expected.to_dict()}")
    files: dict[str, dict] = {}
    total = 0
    for entry in manifest.get("files") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or entry["size"] < 0:
            raise EngineCacheError(f"engine cache manifest has a bad entry: {entry!r}")
        path = _safe_relpath(entry.get("path"))
        if path in files:
            raise EngineCacheError(f"engine cache manifest names {path} twice")
        total += entry["size"]
        if total > max_bytes:
            raise EngineCacheError(f"engine cache is larger than the limit of {max_bytes} bytes")
        files[path] = entry
    if not files:
        raise EngineCacheError("engine cache manifest names no files")
    return files


def unpack(data: bytes, dest: str | Path, expected: CacheKey, max_bytes: int = DEFAULT_MAX_BYTES) -> Unpacked:
    """Check ``data`` against its manifest and ``expected``, then move its files into ``dest``.

    Nothing lands in ``dest`` unless the whole archive checks out: files are written to a staging
    directory inside ``dest`` first and moved into place at the end. What the engine keeps for its own node
    only is checked like the rest but never written: this node probes its own."""
    if len(data) > max_bytes + _MANIFEST_MAX_BYTES:
        raise EngineCacheError(f"engine cache archive is larger than the limit of {max_bytes} bytes")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=dest))
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                files = _read_manifest(tar, expected, max_bytes)
                seen: set[str] = set()
                kept: set[str] = set()
                while (member := tar.next()) is not None:  # not ``for member in tar``: that yields the manifest again
                    path = _safe_relpath(member.name)
                    entry = files.get(path)
                    if entry is None or path in seen:
                        raise EngineCacheError(f"engine cache archive holds {path}, which its manifest does not")
                    if not member.isreg():
                        raise EngineCacheError(f"engine cache archive holds {path} as a link or special file")
                    if member.size != entry["size"]:
                        raise EngineCacheError(f"engine cache file {path} has {member.size} bytes, not {entry['size']}")
                    body = tar.extractfile(member).read()
                    if hashlib.sha256(body).hexdigest() != entry.get("sha256"):
                        raise EngineCacheError(f"engine cache file {path} differs from its checksum")
                    seen.add(path)
                    if _node_local(path, expected.engine):  # a seed of an older agent may have packed it
                        continue
                    target = staging / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(body)
                    kept.add(path)
        except tarfile.TarError as e:
            raise EngineCacheError(f"engine cache archive is unreadable: {e}") from None
        missing = sorted(set(files) - seen)
        if missing:
            raise EngineCacheError(f"engine cache archive lacks {len(missing)} manifest files: {missing[0]}, ...")
        for path in sorted(kept):
            target = dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / path, target)
        return Unpacked(files=len(kept), bytes=sum(files[p]["size"] for p in kept))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class CacheSource:
    """A seed's side: its engine's cache directory, packed once on the first request after the engine
    finished compiling (``ready``), so every client gets the same complete snapshot."""

    def __init__(self, root: str | Path, key: CacheKey, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root)
        self.key = key
        self.max_bytes = max_bytes
        self.ready = False  # set once the engine's API is up: its compilation is done and written
        self._archive: bytes | None = None

    def archive(self) -> bytes:
        if self._archive is None:
            self._archive = pack(self.root, self.key, self.max_bytes)
        return self._archive


def fetch(
    base_url: str,
    token: str,
    dest: str | Path,
    expected: CacheKey,
    timeout_s: float,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Unpacked:
    """A new pod's side: fetch the seed's archive (bounded in time and size), check it and unpack it."""
    url = f"{base_url.rstrip('/')}{ROUTE}"
    limit = max_bytes + _MANIFEST_MAX_BYTES
    deadline = time.monotonic() + timeout_s  # httpx's timeout bounds each read, not the whole body
    try:
        with httpx.stream("GET", url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s) as r:
            if r.status_code != 200:
                body = r.read()[:300].decode(errors="replace")
                raise EngineCacheError(f"seed answered {r.status_code} for its engine cache: {body}")
            size = int(r.headers.get("Content-Length") or 0)
            if size > limit:
                raise EngineCacheError(f"seed's engine cache has {size} bytes, above the limit of {max_bytes}")
            chunks, got = [], 0
            for chunk in r.iter_bytes():
                got += len(chunk)
                if got > limit:
                    raise EngineCacheError(f"seed's engine cache is above the limit of {max_bytes} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise EngineCacheError(f"seed's engine cache did not arrive within {timeout_s:.0f} s")
    except httpx.HTTPError as e:
        raise EngineCacheError(f"could not fetch the seed's engine cache: {type(e).__name__}: {e}") from None
    return unpack(b"".join(chunks), dest, expected, max_bytes)
