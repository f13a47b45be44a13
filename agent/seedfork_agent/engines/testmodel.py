"""Deterministic test models for the reference engine: seeded random weights in safetensors.

The weights are random (the model says nothing sensible) but fully determined by the
size name, so every machine that runs ``make-model`` gets the same bytes, and two
engines holding the same bytes generate the same tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .llama import LlamaConfig, weight_shapes

SIZES: dict[str, LlamaConfig] = {
    # ~1 MB in float32: fast enough for many process-level tests on a small CPU.
    "tiny": LlamaConfig(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    # ~7 MB in float32, with head size 64: the smallest model vLLM's CPU attention serves (vLLM tests, demo).
    "vllm-tiny": LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    # ~100 MB in bfloat16: between the two, where a transfer is no longer lost in the control plane's fixed
    # costs and still short beside a process start (the standby benchmark's middle size).
    "medium": LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        torch_dtype="bfloat16",
    ),
    # ~270 MB in bfloat16: the demo size, big enough that a transfer is visible.
    "small": LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        torch_dtype="bfloat16",
    ),
}
# The shapes of real models (bf16), for benchmarks that move and verify bytes but never generate.
SHAPED_LIKE: dict[str, LlamaConfig] = {
    "llama8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        torch_dtype="bfloat16",
    ),
    "qwen32b": LlamaConfig(
        vocab_size=152064,
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        torch_dtype="bfloat16",
    ),
}
SEED = 20240917


def tensor_specs(name: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every weight of a named size or real-model shape, for ``store.layout``."""
    config = SIZES.get(name) or SHAPED_LIKE[name]
    return [(tensor, config.torch_dtype, shape) for tensor, shape in weight_shapes(config).items()]


def make_weights(config: LlamaConfig, seed: int = SEED) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if len(shape) == 1:  # norm gains near 1, so activations keep their scale
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        weights[name] = t.to(config.dtype).contiguous()
    return weights


def make_model(out: str | Path, size: str = "tiny", shards: int = 2) -> Path:
    """Write ``config.json`` and ``shards`` safetensors files (with an index) into ``out``."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    config = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = make_weights(config)
    names = list(weights)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(config.to_json())
    write_tokenizer(out, config.vocab_size)
    return out


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0-3; bos 1 and eos 2 as in Llama's config defaults


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer in the Hugging Face ``tokenizer.json`` format, so real engines (vLLM) can serve the
    model with no hub access: the special tokens, then ``w4`` ... ``w{vocab-1}``, one word per id, split on
    white space. Every id decodes to a word, so generated ids always map to text and back."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab |= {f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)}
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, tok in enumerate(SPECIAL_TOKENS)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": False},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
