"""INT4 (W4A16) weights, the definition: the kit's packed layout, dequantize, matmul, round-to-nearest.

Layout (the contract with the kernel and plugin: /work/helpers/int4_layout.md, README.md beside this file).
For y = x @ W^T with W (N = out_features, K = in_features) and groups of g consecutive inputs along K:
- qweight uint8 (N, K // 2): byte j of row n holds code[n, 2j] in its low nibble, code[n, 2j + 1] in its high
  nibble. Viewed as (N, K // g, g // 2) it is ONNX Runtime MatMulNBits' B input (bits 4, block_size g).
- scales (N, K // g) in the model's float dtype.
- zeros None (symmetric: zero point 8) or uint8 (N, ceil(G / 2)), 4-bit zero points two per byte along G,
  low nibble first (MatMulNBits' packed zero_points).
- W[n, k] = (code[n, k] - zero[n, k // g]) * scales[n, k // g], in fp32.
- perm None or int64 (K,): the layer computes x[..., perm] @ W^T (GPTQ act-order, groups made contiguous).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SYMMETRIC_ZERO = 8  # the implicit zero point of symmetric weights (MatMulNBits' default, llama.cpp Q4_0's)


@dataclass
class PackedInt4:
    qweight: torch.Tensor               # (N, K // 2) uint8, two codes per byte, low nibble = even k
    scales: torch.Tensor                # (N, K // group_size) float
    zeros: torch.Tensor | None          # None (zero point 8) or (N, ceil(G / 2)) uint8, two per byte along G
    in_features: int
    group_size: int
    perm: torch.Tensor | None = None    # (K,) int64: the layer reads x[..., perm]

    def __post_init__(self):
        N, K, g = self.qweight.shape[0], self.in_features, self.group_size
        if g <= 0 or g % 2 or K % g:
            raise ValueError(f"group_size {g} must be even and divide in_features {K}")
        if self.qweight.dtype != torch.uint8 or tuple(self.qweight.shape) != (N, K // 2):
            raise ValueError(f"qweight must be uint8 ({N}, {K // 2}), got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        if tuple(self.scales.shape) != (N, K // g):
            raise ValueError(f"scales must be ({N}, {K // g}), got {tuple(self.scales.shape)}")
        if self.zeros is not None and (self.zeros.dtype != torch.uint8
                                       or tuple(self.zeros.shape) != (N, -(-(K // g) // 2))):
            raise ValueError(f"zeros must be uint8 ({N}, {-(-(K // g) // 2)}), got {self.zeros.dtype} "
                             f"{tuple(self.zeros.shape)}")
        if self.perm is not None and tuple(self.perm.shape) != (K,):
            raise ValueError(f"perm must be ({K},), got {tuple(self.perm.shape)}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., M) integer codes 0..15 -> (..., ceil(M / 2)) uint8, element 2j in the low nibble of byte j."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("4-bit codes must lie in 0..15")
    codes = codes.to(torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)  # (..., M / 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """(..., B) uint8 -> (..., count) uint8 codes: the inverse of pack_nibbles."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], -1)[..., :count]


def codes_of(p: PackedInt4) -> torch.Tensor:
    """The (N, K) uint8 codes."""
    return unpack_nibbles(p.qweight, p.in_features)


def zero_points_of(p: PackedInt4) -> torch.Tensor:
    """The (N, G) uint8 zero points (8 everywhere for symmetric weights)."""
    if p.zeros is None:
        return torch.full((p.out_features, p.groups), SYMMETRIC_ZERO, dtype=torch.uint8)
    return unpack_nibbles(p.zeros, p.groups)


def int4_dequantize(p: PackedInt4) -> torch.Tensor:
    """The fp32 weight (N, K) that p encodes, columns in p's own (sorted) order: W_sorted."""
    N, G, g = p.out_features, p.groups, p.group_size
    codes = codes_of(p).float().reshape(N, G, g)
    zeros = zero_points_of(p).float().unsqueeze(-1)
    return ((codes - zeros) * p.scales.float().unsqueeze(-1)).reshape(N, p.in_features)


def int4_linear_ref(x: torch.Tensor, p: PackedInt4) -> torch.Tensor:
    """y = x[..., perm] @ W^T with W from codes, zero points and scales; fp32 accumulation, x's dtype out."""
    if p.perm is not None:
        x = x.index_select(-1, p.perm)
    return (x.float() @ int4_dequantize(p).T).to(x.dtype)


def quantize_rtn(weight: torch.Tensor, group_size: int, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.float16) -> PackedInt4:
    """Round-to-nearest 4-bit quantization of a float weight (N, K) per group of group_size inputs.

    Symmetric is llama.cpp's Q4_0 rule (ggml-quants.c quantize_row_q4_0_ref), so a group of 32 holds the very
    numbers a Q4_0 block would: d = m / -8 with m the group's element of largest magnitude (sign kept),
    code = min(15, trunc(w * (1 / d) + 8.5)) in fp32, scale stored as d rounded to scale_dtype (Q4_0 keeps
    fp16). Why /8 and not max|w| / 7: it spends all 16 codes (the extreme lands exactly on code 0), so the
    rounding step is max|w| / 8 rather than / 7, and a Q4_0 export writes the same values.
    Asymmetric is the GPTQ/AWQ min-max rule: scale = (max - min) / 15, zero = clamp(round(-min / scale), 0,
    15), code = clamp(round(w / scale) + zero, 0, 15).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if group_size <= 0 or group_size % 2 or K % group_size:
        raise ValueError(f"group_size {group_size} must be even and divide in_features {K}")
    G = K // group_size
    w = weight.float().reshape(N, G, group_size)
    if symmetric:
        idx = w.abs().argmax(dim=-1, keepdim=True)
        d = w.gather(-1, idx) / -8.0  # (N, G, 1)
        inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
        codes = (w * inv + 8.5).to(torch.int32).clamp(max=15)  # trunc, like ggml's (int8_t) cast
        return PackedInt4(pack_nibbles(codes.reshape(N, K)), d.squeeze(-1).to(scale_dtype).contiguous(),
                          None, K, group_size)
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scale = ((hi - lo).clamp(min=1e-5) / 15).to(scale_dtype).float()
    zero = torch.round(-lo / scale).clamp(0, 15)
    codes = (torch.round(w / scale) + zero).clamp(0, 15).to(torch.int32)
    return PackedInt4(pack_nibbles(codes.reshape(N, K)), scale.squeeze(-1).to(scale_dtype).contiguous(),
                      pack_nibbles(zero.squeeze(-1).to(torch.int32)), K, group_size)


def weight_bytes(p: PackedInt4) -> int:
    """Bytes a matmul reads for the weight: codes, scales, zero points."""
    zeros = p.zeros.numel() if p.zeros is not None else 0
    return p.qweight.numel() + p.scales.numel() * p.scales.element_size() + zeros
