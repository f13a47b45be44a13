"""The engine-layout store: every rank's parameters as one store, and the digest both sides compute."""

from __future__ import annotations

import pytest
import torch

from seedfork_agent.checksum import checksum
from seedfork_agent.engines.engine_store import engine_manifest, params_digest, rank_digest, rank_entries, ranks_of
from seedfork_agent.store import WeightStore, dtype_name


def test_each_rank_gets_its_own_tensors_and_the_agent_computes_the_digest_the_engine_reports():
    layouts = {
        0: [("b.weight", "float32", (4, 3)), ("a.bias", "float32", (3,))],
        1: [("b.weight", "float32", (4, 3)), ("a.bias", "float32", (3,))],
    }
    store = WeightStore.empty(engine_manifest(layouts, "fp"))
    try:
        assert ranks_of(store.manifest) == {0, 1}
        params = {}
        for r in (0, 1):  # what an engine rank does: fill its part, then digest its parameters itself
            for name, entry in rank_entries(store.manifest, r).items():
                view = store.tensor(entry.name)
                view.copy_(torch.randn(view.shape))
                params[(r, name)] = view
        store.manifest = store.manifest.with_checksums(store.compute_checksums())
        for r in (0, 1):
            engine = params_digest(
                (name, dtype_name(t.dtype), list(t.shape), checksum(t.reshape(-1).view(torch.uint8)))
                for (rank, name), t in params.items()
                if rank == r
            )
            assert engine == rank_digest(store.manifest, r)
        assert rank_digest(store.manifest, 0) != rank_digest(store.manifest, 1)  # ranks are paired, not pooled
        params[(1, "a.bias")][0] += 1  # an engine that writes into its parameters changes what it serves
        changed = store.manifest.with_checksums(store.compute_checksums())
        assert rank_digest(changed, 1) != rank_digest(store.manifest, 1)
        assert rank_digest(changed, 0) == rank_digest(store.manifest, 0)
    finally:
        store.close()


def test_a_checkpoint_manifest_is_not_an_engine_store():
    store = WeightStore.empty(engine_manifest({0: [("w", "float32", (2,))]}, "fp"))
    try:
        with pytest.raises(ValueError, match="no checksummed parameters for rank 1"):
            rank_digest(store.manifest, 1)
        with pytest.raises(ValueError, match="no checksummed"):
            rank_digest(store.manifest, 0)  # not yet filled
    finally:
        store.close()
    from seedfork_agent.store import layout

    with pytest.raises(ValueError, match="not an engine rank's parameter"):
        ranks_of(layout([("model.embed_tokens.weight", "float32", (2,))], "fp"))
    with pytest.raises(ValueError, match=r"cover ranks 0\.\.1"):
        engine_manifest({0: [("w", "float32", (2,))], 2: [("w", "float32", (2,))]}, "fp")
