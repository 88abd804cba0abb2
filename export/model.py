"""MiniCPM4 and MiniCPM5 in plain PyTorch: the definition every other part of the kit is checked against.

Reads top to bottom: config, model, blocks, leaves, RoPE. MiniCPM4 differs from Llama in three muP scalars
(embedding scale, residual scale, logit scale) and LongRoPE; MiniCPM5 is a plain Llama (all three scalars 1,
head_dim its own config value). Both are the same module: the differences are config values only.
Attention goes through one swappable callable (`Attention.attend`) so InfLLM v2 sparse attention plugs in
as a transform of a built model. Facts: docs/model.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from trt_plugins.attention.reference import InfLLMv2Config, attention_ref


@dataclass
class LongRoPE:
    """LongRoPE: per-frequency divisors, short ones up to `original_max`, long ones beyond."""
    short_factor: list[float]
    long_factor: list[float]
    original_max: int


@dataclass
class MiniCPMConfig:
    vocab_size: int = 73448
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[LongRoPE] = None   # None: plain RoPE
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: int = 0                    # 0: hidden_size (logit scale 1)
    residual_scale: float = 0.0                # 0: scale_depth / sqrt(num_hidden_layers) (muP); Llama: 1
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])
    sparse: Optional[InfLLMv2Config] = None  # sparse_config: InfLLM v2 (use_sparse_attention)
    head_dim: int = 0                          # 0: hidden_size / num_attention_heads (MiniCPM4)
    model_type: str = "minicpm"                # config.json's: "minicpm" (MiniCPM4) or "llama" (MiniCPM5)

    def __post_init__(self):
        if self.dim_model_base == 0:
            self.dim_model_base = self.hidden_size
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.residual_scale == 0:
            self.residual_scale = self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base


class KVCache(nn.Module):
    """Fixed-shape key/value buffers for one layer, written by position. Shapes: (B, Hkv, S, D)."""

    def __init__(self, max_batch: int, max_seq: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_row: int = 0):
        """Write k, v (B, T, Hkv, D) at positions pos (B, T) of rows first_row.. ; return those rows."""
        rows = torch.arange(first_row, first_row + k.shape[0], device=k.device)[:, None]  # (B, 1)
        self.k[rows, :, pos] = k  # advanced indices around a slice: target viewed as (B, T, Hkv, D)
        self.v[rows, :, pos] = v
        return self.k[first_row:first_row + k.shape[0]], self.v[first_row:first_row + k.shape[0]]


# The attention op: (q (B, H, T, D), k (B, Hkv, S, D), v, q_pos (B, T)) -> (B, H, T, D).
# Key j of a row is visible to a query at position p when j <= p; keys past a row's length are never
# visible because they sit at positions greater than every query of that row. The default is dense causal
# attention (trt_plugins/attention/reference.py holds the definition, shared with the kernels' tests).
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class MiniCPM(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.max_batch = self.max_seq = 0
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def setup_cache(self, max_batch: int, max_seq: int):
        """Allocate KV caches and the RoPE table for this capacity (the LongRoPE factor depends on it)."""
        c, p = self.config, self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_seq, c.num_key_value_heads, c.head_dim,
                                               p.dtype, p.device)
        self.setup_rope(max_seq)
        self.max_batch = max_batch

    def setup_rope(self, max_seq: int):
        """The RoPE table for this context capacity (the ONNX export needs it without any cache)."""
        self.rope_cos, self.rope_sin = rope_table(self.config, max_seq, device=self.embed_tokens.weight.device)
        self.max_seq = max_seq

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, first_row: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """input_ids, input_pos: (B, T) for cache rows first_row..first_row+B-1.

        Returns fp32 logits (B, T, V), or (B, 1, V) of the last position with last_only, and writes the
        new keys and values into the caches.
        """
        if torch.onnx.is_in_onnx_export():
            pass  # the exported graph gets its caches as inputs; the runtime checks capacity
        elif first_row + input_ids.shape[0] > self.max_batch or int(input_pos.max()) >= self.max_seq:
            raise ValueError(f"rows {first_row}..{first_row + input_ids.shape[0] - 1} / position "
                             f"{int(input_pos.max())} exceed the cache ({self.max_batch} x {self.max_seq}); "
                             f"call setup_cache with more room")
        c = self.config
        h = self.embed_tokens(input_ids) * c.scale_emb  # (B, T, hidden)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (B, T, D/2) fp32
        for layer in self.layers:
            h = layer(h, input_pos, cos, sin, first_row)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h) / c.logit_divisor
        return self.lm_head(h).float()


class DecoderLayer(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.residual_scale = config.residual_scale

    def forward(self, h, pos, cos, sin, first_row=0):
        h = h + self.self_attn(self.input_layernorm(h), pos, cos, sin, first_row) * self.residual_scale
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_scale


class Attention(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        d, h, hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.n_heads, self.n_kv_heads, self.head_dim = h, hkv, d
        self.q_proj = nn.Linear(config.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.kv_cache: Optional[KVCache] = None
        self.attend: AttentionFn = attention_ref
        # Cache update + attention as one swappable step; the ONNX export replaces it by graph nodes.
        self.cache_and_attend = self.cached_attention

    def forward(self, x, pos, cos, sin, first_row=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (B, T, H, D)
        y = self.cache_and_attend(q, k, v, pos, first_row)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, -1))

    def cached_attention(self, q, k, v, pos, first_row=0):
        """Write k, v into this layer's KV cache, then attend over the whole cache. (B, T, H, D) out."""
        k_all, v_all = self.kv_cache.update(pos, k, v, first_row)  # (B, Hkv, S, D)
        return self.attend(q.transpose(1, 2), k_all, v_all, pos).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: MiniCPMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def rope_table(config: MiniCPMConfig, max_seq: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq, head_dim/2) in fp32, LongRoPE factors chosen by capacity."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    factor = torch.ones_like(inv_freq)
    scale = longrope_scale(config)
    rs = config.rope_scaling
    if rs is not None:
        use_long = max(config.max_position_embeddings, max_seq) > rs.original_max
        factor = torch.tensor(rs.long_factor if use_long else rs.short_factor, dtype=torch.float32,
                              device=device)
    t = torch.arange(max_seq, dtype=torch.float32, device=device)
    freqs = torch.outer(t, 1.0 / factor) * inv_freq  # (S, D/2); this rounding order matches upstream
    return freqs.cos() * scale, freqs.sin() * scale


def longrope_scale(config: MiniCPMConfig) -> float:
    """The factor on cos and sin when the context was extended: sqrt(1 + ln(max_pos / orig) / ln(orig))."""
    rs = config.rope_scaling
    if rs is None or config.max_position_embeddings <= rs.original_max:
        return 1.0
    ratio = config.max_position_embeddings / rs.original_max
    return math.sqrt(1 + math.log(ratio) / math.log(rs.original_max))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32. x: (B, T, H, D); cos, sin: (B, T, D/2)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
