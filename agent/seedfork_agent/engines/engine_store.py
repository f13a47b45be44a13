"""The engine-layout store: an engine's own parameters, rank by rank, as one store the agent serves.

An engine that loads its weights itself (vLLM through ``vllm_loader``) fuses and shards the checkpoint
into its own parameters (``qkv_proj``, ``gate_up_proj``, one shard per tensor-parallel rank). Holding the
checkpoint beside those parameters would keep every weight twice for the pod's life. So a pod keeps
one copy: a store whose tensors are the engine's parameters as each rank holds them, named
``rank<r>/<parameter>``, and the engine's parameters *are* that store's memory (on CPU, views of the
shared-memory file the agent serves; no private copy). A seed serves that store; a new pod of the same
fingerprint (which pins engine, version and parallelism, so the layouts match) pulls it whole, and its
rank ``r`` maps exactly the bytes the seed's rank ``r`` computes with: rank-paired by construction.

What a rank proves is a digest over its parameters' names, dtypes, shapes and byte checksums. The
agent computes the same digest from the store's manifest, so "the engine holds what the agent
verified" and "what the seed's engine holds" are both one string comparison per rank.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

from ..store import Manifest, TensorEntry, layout, torch_dtype

# One rank's tensors: (parameter name, dtype name, shape).
RankLayout = Sequence[tuple[str, str, tuple[int, ...]]]


def rank_prefix(rank: int) -> str:
    return f"rank{rank}/"


def engine_manifest(layouts: Mapping[int, RankLayout], fingerprint: str) -> Manifest:
    """The store for every rank's parameters (checksums not yet known: the engine fills the bytes)."""
    if sorted(layouts) != list(range(len(layouts))):
        raise ValueError(f"engine layouts must cover ranks 0..{len(layouts) - 1}, got {sorted(layouts)}")
    specs = [
        (rank_prefix(r) + name, dtype, tuple(shape))
        for r in sorted(layouts)
        for name, dtype, shape in sorted(layouts[r], key=lambda t: t[0])
    ]
    return layout(specs, fingerprint)


def rank_entries(manifest: Manifest, rank: int) -> dict[str, TensorEntry]:
    """One rank's tensors of an engine-layout manifest, by parameter name (the prefix taken off)."""
    prefix = rank_prefix(rank)
    return {t.name[len(prefix) :]: t for t in manifest.tensors if t.name.startswith(prefix)}


def ranks_of(manifest: Manifest) -> set[int]:
    """Which ranks an engine-layout manifest holds; ``ValueError`` for a tensor outside any rank."""
    ranks = set()
    for t in manifest.tensors:
        head, sep, _ = t.name.partition("/")
        if not sep or not head.startswith("rank") or not head[4:].isdigit():
            raise ValueError(f"tensor {t.name!r} is not an engine rank's parameter (rank<r>/<name>)")
        ranks.add(int(head[4:]))
    return ranks


def params_digest(items: Iterable[tuple[str, str, Sequence[int], str]]) -> str:
    """Digest of one rank's parameters from (name, dtype name, shape, checksum), in any order."""
    h = hashlib.sha256()
    for name, dtype, shape, checksum in sorted(items, key=lambda t: t[0]):
        h.update(json.dumps([name, dtype, list(shape), checksum]).encode())
    return h.hexdigest()


def rank_digest(manifest: Manifest, rank: int) -> str:
    """The digest rank ``rank``'s engine must report when its parameters are this store's bytes."""
    entries = rank_entries(manifest, rank)
    if not entries or any(not e.checksum for e in entries.values()):
        raise ValueError(f"the store has no checksummed parameters for rank {rank}")
    return params_digest((name, e.dtype, e.shape, e.checksum) for name, e in entries.items())


def parse_layout(raw: object) -> list[tuple[str, str, tuple[int, ...]]]:
    """A rank's reported layout (``[[name, dtype, [dims...]], ...]``); ``ValueError`` says what is wrong."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("tensors must be a non-empty list of [name, dtype, shape]")
    out, seen = [], set()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 3):
            raise ValueError("each of tensors must be [name, dtype, shape]")
        name, dtype, shape = item
        if not isinstance(name, str) or not name or len(name) > 512 or name in seen:
            raise ValueError(f"tensor name {str(name)[:80]!r} must be a unique non-empty string")
        if not isinstance(dtype, str):
            raise ValueError(f"tensor {name}: dtype must be a string")
        try:
            torch_dtype(dtype)
        except ValueError:
            raise ValueError(f"tensor {name}: unknown dtype {dtype[:40]!r}") from None
        dims_ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        if not dims_ok:
            raise ValueError(f"tensor {name}: shape must be a list of non-negative integers")
        seen.add(name)
        out.append((name, dtype, tuple(shape)))
    return out
