"""The weight store: named tensors in one contiguous byte buffer, with a manifest.

One buffer means one TransferEngine registration and one mapping for a local
engine process. On CPU the buffer is a shared-memory file (``/dev/shm``), so an
engine process maps the same pages zero-copy; on GPU it is one CUDA allocation,
shared through a CUDA IPC handle. Tensors start at 256-byte aligned offsets.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import json
import os
import pickle
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checksum import checksums

ALIGN = 256
# In a pod, /dev/shm must be a memory-backed emptyDir large enough for the weights (the default is 64 MiB).
SHM_DIR = Path(
    os.environ.get("SEEDFORK_SHM_DIR") or ("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
)
_SHM_PREFIX = "seedfork-"

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}") from None


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int
    checksum: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def element_size(self) -> int:
        return torch_dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Manifest:
    """What a seed offers: every tensor's place and checksum, the set's digest, its identity."""

    fingerprint: str
    tensors: tuple[TensorEntry, ...]
    total_bytes: int  # the buffer size, padding included

    # A manifest never changes, so what is derived from it is computed once: a pull's critical path reads
    # these for every tensor (a Llama-8B set has 291), and a seed serves the same manifest to every client.
    @functools.cached_property
    def digest(self) -> str:
        """Content digest of the whole set: changes if any name, layout or checksum does."""
        h = hashlib.sha256()
        for t in self.tensors:
            h.update(json.dumps([t.name, t.dtype, list(t.shape), t.nbytes, t.offset, t.checksum]).encode())
        return h.hexdigest()

    @property
    def payload_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def entry(self, name: str) -> TensorEntry:
        return self._by_name[name]

    @functools.cached_property
    def _by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}

    @functools.cached_property
    def json_bytes(self) -> bytes:
        """``to_dict()`` as JSON, what ``GET /v1/manifest`` sends."""
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    def with_checksums(self, sums: dict[str, str]) -> Manifest:
        tensors = tuple(TensorEntry(**{**asdict(t), "checksum": sums[t.name]}) for t in self.tensors)
        return Manifest(self.fingerprint, tensors, self.total_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "digest": self.digest,
            "totalBytes": self.total_bytes,
            "payloadBytes": self.payload_bytes,
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "nbytes": t.nbytes,
                    "offset": t.offset,
                    "checksum": t.checksum,
                }
                for t in self.tensors
            ],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        """Parse and validate a manifest received from a peer: bad layouts are refused, not trusted."""
        try:
            tensors = tuple(
                TensorEntry(
                    name=str(t["name"]),
                    dtype=str(t["dtype"]),
                    shape=tuple(int(d) for d in t["shape"]),
                    nbytes=int(t["nbytes"]),
                    offset=int(t["offset"]),
                    checksum=str(t.get("checksum", "")),
                )
                for t in raw["tensors"]
            )
            manifest = cls(str(raw["fingerprint"]), tensors, int(raw["totalBytes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed manifest: {e!r}") from None
        manifest.validate()
        if raw.get("digest") and raw["digest"] != manifest.digest:
            raise ValueError("manifest digest does not match its entries")
        return manifest

    def validate(self) -> None:
        names = set()
        end = 0
        for t in sorted(self.tensors, key=lambda t: t.offset):
            if t.name in names:
                raise ValueError(f"duplicate tensor {t.name!r}")
            names.add(t.name)
            if t.nbytes != t.numel * t.element_size or any(d < 0 for d in t.shape):
                raise ValueError(f"tensor {t.name!r}: nbytes does not match shape and dtype")
            if t.offset < end or t.offset % ALIGN:
                raise ValueError(f"tensor {t.name!r}: overlapping or unaligned offset {t.offset}")
            end = t.offset + t.nbytes
        if end > self.total_bytes:
            raise ValueError("tensors run past the end of the buffer")


def layout(specs: list[tuple[str, str, tuple[int, ...]]], fingerprint: str) -> Manifest:
    """Place tensors back to back at aligned offsets, in the given order."""
    entries = []
    offset = 0
    for name, dtype, shape in specs:
        entry = TensorEntry(name, dtype, tuple(shape), 0, offset)
        entry = TensorEntry(name, dtype, tuple(shape), entry.numel * entry.element_size, offset)
        entries.append(entry)
        offset = _align(offset + entry.nbytes)
    return Manifest(fingerprint, tuple(entries), max(offset, ALIGN))


def resolve_device(device: str | torch.device) -> torch.device:
    """The device with its index: a bare ``cuda`` means the current CUDA device, so that worker threads
    can make it current with ``torch.cuda.set_device`` (which refuses a device without an index)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class WeightStore:
    """Named tensors as views into one buffer this process owns.

    Build one with ``from_safetensors`` (storage source) or ``empty`` (a client
    before it pulls). ``close()`` frees the memory and unlinks the shared file.
    """

    def __init__(self, manifest: Manifest, device: str = "cpu", shm_dir: Path | None = None) -> None:
        manifest.validate()
        self.manifest = manifest
        self.device = resolve_device(device)
        self._shm_path: Path | None = None
        self._lock_fd: int | None = None
        n = manifest.total_bytes
        if self.device.type == "cpu":
            directory = shm_dir or SHM_DIR
            self._shm_path = directory / f"{_SHM_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self._lock_fd = os.open(self._shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # "owner alive" marker for remove_stale_shm
            os.ftruncate(self._lock_fd, n)
            self.buffer = torch.from_file(str(self._shm_path), shared=True, size=n, dtype=torch.uint8)
        else:
            self.buffer = torch.empty(n, dtype=torch.uint8, device=self.device)
        self._closed = False

    # ---- constructors -----------------------------------------------------
    @classmethod
    def empty(cls, manifest: Manifest, device: str = "cpu", shm_dir: Path | None = None) -> WeightStore:
        """A store shaped like ``manifest``, its bytes not yet filled (client side)."""
        return cls(manifest, device, shm_dir)

    @classmethod
    def from_safetensors(
        cls, directory: str | Path, fingerprint: str, device: str = "cpu", shm_dir: Path | None = None
    ) -> WeightStore:
        """Load every tensor of every ``*.safetensors`` file (sorted by file, then name) and checksum it."""
        from safetensors import safe_open

        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {directory}")
        specs = []
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    sl = f.get_slice(name)
                    specs.append((name, _safetensors_dtype(sl.get_dtype()), tuple(sl.get_shape()), path))
        names = [s[0] for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("a tensor name appears in more than one safetensors file")
        manifest = layout([(n, d, s) for n, d, s, _ in specs], fingerprint)
        store = cls(manifest, device, shm_dir)
        try:
            for path in files:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118
                        store.tensor(name).copy_(f.get_tensor(name))
            store.manifest = manifest.with_checksums(store.compute_checksums())
        except BaseException:
            store.close()
            raise
        return store

    # ---- access -----------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """A typed, shaped view of one tensor's bytes (no copy)."""
        e = self.manifest.entry(name)
        return self.raw(name).view(torch_dtype(e.dtype)).view(e.shape)

    def raw(self, name: str) -> torch.Tensor:
        e = self.manifest.entry(name)
        return self.buffer[e.offset : e.offset + e.nbytes]

    def data_ptr(self, name: str) -> int:
        return self.buffer.data_ptr() + self.manifest.entry(name).offset

    @property
    def nbytes(self) -> int:
        return self.manifest.total_bytes

    # ---- verification -----------------------------------------------------
    def compute_checksums(self) -> dict[str, str]:
        return manifest_checksums(self.buffer, self.manifest)

    def verify(self, expected: Manifest) -> list[str]:
        """Names whose bytes do not match ``expected``'s checksums (empty list: all good)."""
        if [(t.name, t.offset, t.nbytes) for t in expected.tensors] != [
            (t.name, t.offset, t.nbytes) for t in self.manifest.tensors
        ]:
            raise ValueError("store layout differs from the expected manifest")
        got = self.compute_checksums()
        return [t.name for t in expected.tensors if not t.checksum or got[t.name] != t.checksum]

    # ---- sharing with a local engine process -----------------------------
    def attach_info(self) -> dict[str, Any]:
        """How another process on this host maps the same memory (JSON-able)."""
        if self._shm_path is not None:
            return {"kind": "shm", "path": str(self._shm_path), "nbytes": self.nbytes}
        from torch.multiprocessing.reductions import reduce_tensor

        rebuild, args = reduce_tensor(self.buffer)
        return {
            "kind": "cuda_ipc",
            "device": self.device.index if self.device.index is not None else torch.cuda.current_device(),
            "nbytes": self.nbytes,
            # torch's own IPC rebuild arguments (cudaIpc handle, offsets, ref counter), pickled.
            "torch_ipc": base64.b64encode(pickle.dumps((rebuild, args))).decode(),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.buffer = torch.empty(0, dtype=torch.uint8)
        if self._shm_path is not None:
            try:
                self._shm_path.unlink()
            except FileNotFoundError:
                pass
            if self._lock_fd is not None:
                os.close(self._lock_fd)
        elif self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> WeightStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale_shm(directory: Path | None = None) -> list[Path]:
    """Unlink store files whose owner died without closing them.

    An owner holds a shared flock on its file for the store's lifetime; a file we can lock
    exclusively has no owner left (this works across PID namespaces, unlike checking pids).
    """
    removed = []
    for path in (directory or SHM_DIR).glob(f"{_SHM_PREFIX}*"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner is alive
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def manifest_checksums(buffer: torch.Tensor, manifest: Manifest) -> dict[str, str]:
    """Every tensor's checksum, read from a store's whole buffer laid out as ``manifest`` says."""
    sums = checksums(buffer, [(t.offset, t.nbytes) for t in manifest.tensors])
    return {t.name: s for t, s in zip(manifest.tensors, sums, strict=True)}


def attach(info: dict[str, Any], manifest: Manifest) -> dict[str, torch.Tensor]:
    """In another process: map a store's buffer from ``attach_info`` and return its named tensor views."""
    return tensor_views(attach_buffer(info), manifest)


def tensor_views(buffer: torch.Tensor, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The named tensors of a store's whole buffer (views, no copy)."""
    if buffer.numel() != manifest.total_bytes:
        raise ValueError("mapped buffer size differs from the manifest")
    return {
        t.name: buffer[t.offset : t.offset + t.nbytes].view(torch_dtype(t.dtype)).view(t.shape)
        for t in manifest.tensors
    }


def attach_buffer(info: dict[str, Any]) -> torch.Tensor:
    """In another process: the store's whole uint8 buffer, mapped (no copy)."""
    if info["kind"] == "shm":
        buffer = torch.from_file(info["path"], shared=True, size=int(info["nbytes"]), dtype=torch.uint8)
    elif info["kind"] == "cuda_ipc":
        rebuild, args = pickle.loads(base64.b64decode(info["torch_ipc"]))  # from our own agent, token-guarded
        buffer = rebuild(*args)
    else:
        raise ValueError(f"unknown attach kind {info['kind']!r}")
    return buffer


def _safetensors_dtype(code: str) -> str:
    codes = {
        "BF16": "bfloat16",
        "F16": "float16",
        "F32": "float32",
        "F64": "float64",
        "I8": "int8",
        "U8": "uint8",
        "I16": "int16",
        "I32": "int32",
        "I64": "int64",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }
    try:
        return codes[code]
    except KeyError:
        raise ValueError(f"unsupported safetensors dtype {code}") from None
