"""A compact Llama-architecture causal LM over a dict of named tensors.

The model owns no parameters: it reads the weights from a ``{name: tensor}`` mapping
(Hugging Face Llama names), so the tensors can be views into a buffer shared with the
agent, and attaching costs no copy. RMSNorm, rotary position embeddings, grouped-query
attention and a SwiGLU MLP, as in Llama; generation is greedy, hence deterministic.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    torch_dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.torch_dtype)

    def to_json(self) -> str:
        return json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **asdict(self)}, indent=2)

    @classmethod
    def from_dict(cls, raw: Mapping) -> LlamaConfig:
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        config = cls(**known)
        if config.hidden_size % config.num_attention_heads or config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("hidden_size must divide by heads, and heads by key/value heads")
        return config

    @classmethod
    def load(cls, path: str | Path) -> LlamaConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))


def weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the model reads, with its shape, in checkpoint order."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (i, h),
            f"{p}.mlp.up_proj.weight": (i, h),
            f"{p}.mlp.down_proj.weight": (h, i),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return shapes


def check_weights(config: LlamaConfig, weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights that do not fit the config, naming every problem."""
    problems = []
    for name, shape in weight_shapes(config).items():
        t = weights.get(name)
        if t is None:
            problems.append(f"missing {name}")
        elif tuple(t.shape) != shape or t.dtype != config.dtype:
            problems.append(f"{name}: {t.dtype} {tuple(t.shape)}, expected {config.dtype} {shape}")
    if problems:
        raise ValueError("weights do not match the model config: " + "; ".join(problems[:10]))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    # x: [heads, seq, head_dim]; rotate-half formulation, as in Llama.
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaModel:
    """Forward pass and greedy decoding over borrowed weights (no copies)."""

    def __init__(self, config: LlamaConfig, weights: Mapping[str, torch.Tensor]):
        check_weights(config, weights)
        self.config = config
        self.w = weights

    @property
    def device(self) -> torch.device:
        return self.w["model.embed_tokens.weight"].device

    def _layer(self, layer: int, x: torch.Tensor, positions: torch.Tensor, cache: dict) -> torch.Tensor:
        c, w, p = self.config, self.w, f"model.layers.{layer}"
        seq, nh, nkv, hd = x.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
        h = _rms_norm(x, w[f"{p}.input_layernorm.weight"], c.rms_norm_eps)
        q = (h @ w[f"{p}.self_attn.q_proj.weight"].T).view(seq, nh, hd).transpose(0, 1)
        k = (h @ w[f"{p}.self_attn.k_proj.weight"].T).view(seq, nkv, hd).transpose(0, 1)
        v = (h @ w[f"{p}.self_attn.v_proj.weight"].T).view(seq, nkv, hd).transpose(0, 1)
        q, k = _rope(q, positions, c.rope_theta), _rope(k, positions, c.rope_theta)
        if layer in cache:
            k = torch.cat([cache[layer][0], k], dim=1)
            v = torch.cat([cache[layer][1], v], dim=1)
        cache[layer] = (k, v)
        group = nh // nkv
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        total = k.shape[1]
        # Causal mask over the whole (cached + new) sequence: query at position p sees keys <= p.
        mask = torch.arange(total, device=x.device)[None, :] <= positions[:, None]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + attn.transpose(0, 1).reshape(seq, nh * hd) @ w[f"{p}.self_attn.o_proj.weight"].T
        h = _rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], c.rms_norm_eps)
        gate = F.silu(h @ w[f"{p}.mlp.gate_proj.weight"].T)
        up = h @ w[f"{p}.mlp.up_proj.weight"].T
        return x + (gate * up) @ w[f"{p}.mlp.down_proj.weight"].T

    def _logits(self, tokens: torch.Tensor, start: int, cache: dict) -> torch.Tensor:
        positions = torch.arange(start, start + tokens.shape[0], device=self.device)
        x = self.w["model.embed_tokens.weight"][tokens]
        for layer in range(self.config.num_hidden_layers):
            x = self._layer(layer, x, positions, cache)
        x = _rms_norm(x[-1:], self.w["model.norm.weight"], self.config.rms_norm_eps)
        return (x @ self.w["lm_head.weight"].T)[0]

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt`` (token ids); returns only the new tokens."""
        c = self.config
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if any(not 0 <= t < c.vocab_size for t in prompt):
            raise ValueError(f"token ids must lie in [0, {c.vocab_size})")
        max_new_tokens = min(max_new_tokens, c.max_position_embeddings - len(prompt))
        if max_new_tokens < 0:
            raise ValueError(f"prompt longer than max_position_embeddings={c.max_position_embeddings}")
        cache: dict = {}
        tokens = torch.tensor(prompt, device=self.device)
        out: list[int] = []
        start = 0
        for _ in range(max_new_tokens):
            logits = self._logits(tokens, start, cache)
            start += tokens.shape[0]
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            tokens = torch.tensor([nxt], device=self.device)
        return out
