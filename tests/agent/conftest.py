"""Helpers for agent tests: a small safetensors weight set."""

from __future__ import annotations

import pytest
import torch


def make_weights(seed: int = 0, layers: int = 3) -> dict[str, torch.Tensor]:
    """A few MB of Llama-shaped tensors in mixed dtypes, odd sizes included."""
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(1000, 256, generator=g).to(torch.bfloat16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = torch.randn(768, 256, generator=g).to(torch.bfloat16)
        out[p + "mlp.down_proj.weight"] = torch.randn(256, 701, generator=g).to(torch.bfloat16)
        out[p + "input_layernorm.weight"] = torch.randn(255, generator=g)  # float32, odd length
        out[p + "tiny.bias"] = torch.randn(3, generator=g).to(torch.float16)  # 6 bytes: a tail
    out["lm_head.weight"] = torch.randn(1000, 256, generator=g).to(torch.bfloat16)
    return out


@pytest.fixture(scope="session")
def weight_tensors() -> dict[str, torch.Tensor]:
    return make_weights()


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory, weight_tensors):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("weights")
    names = sorted(weight_tensors)
    half = len(names) // 2
    save_file({n: weight_tensors[n] for n in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({n: weight_tensors[n] for n in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    return d
