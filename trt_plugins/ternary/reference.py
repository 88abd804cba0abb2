"""BitCPM4 ternary weights, the definition: detect the scale layout, pack to 2 bits, unpack, matmul.

BitCPM4 checkpoints are fake-quantized: each linear weight is stored as scale * T, T in {-1, 0, +1}, with
one scale per group of inputs whose layout is not documented. detect_layout finds it from the weights.

Packed layout (see README.md beside this file): a row of K weights is padded to a multiple of 128 and cut
into tiles of 128; tile t is 32 bytes, and byte i of it holds the weights t*128 + i + 32*s for s = 0..3 in
bits 2s..2s+1 (code 0 = 0, 1 = +1, 2 = -1). Each 2-bit plane of a tile is then 32 consecutive weights,
so a kernel unpacks with a shift and a mask, no shuffles. Scales are fp32 (N, K / group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TILE = 128        # weights per packed tile (32 bytes)
PLANE = TILE // 4  # consecutive weights per 2-bit plane
GROUP_CANDIDATES = (4096, 2048, 1024, 512, 256, 128, 64, 32)


class NotTernaryError(ValueError):
    """A weight that is not scale * {-1, 0, +1} under any group layout this kit packs."""


@dataclass(frozen=True)
class TernaryLayout:
    kind: str        # "tensor", "row" or "group"
    group_size: int  # inputs sharing one scale (K for tensor and row)


@dataclass
class PackedTernary:
    packed: torch.Tensor   # (N, K_pad / 4) uint8
    scales: torch.Tensor   # (N, K / group_size) fp32
    in_features: int
    layout: TernaryLayout

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]


def _uniform_magnitude(groups: torch.Tensor) -> bool:
    """Every group's non-zero entries share one magnitude."""
    a = groups.abs()
    top = a.amax(dim=-1, keepdim=True)
    return bool(((a == 0) | (a == top)).all())


def detect_layout(w: torch.Tensor, name: str = "weight") -> TernaryLayout:
    """The coarsest scale layout under which w is scale * {-1, 0, +1}, or NotTernaryError."""
    if w.dim() != 2:
        raise NotTernaryError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    w = w.float()
    if _uniform_magnitude(w.reshape(1, -1)):
        return TernaryLayout("tensor", K)
    if _uniform_magnitude(w):
        return TernaryLayout("row", K)
    for g in GROUP_CANDIDATES:
        if g < K and K % g == 0 and _uniform_magnitude(w.reshape(N, K // g, g)):
            return TernaryLayout("group", g)
    a = w.abs()
    distinct = max(len(torch.unique(a[r][a[r] > 0])) for r in range(min(N, 8)))
    raise NotTernaryError(f"{name}: not a ternary weight (rows hold up to {distinct} distinct magnitudes; "
                          f"no per-tensor, per-row or per-group-of-{GROUP_CANDIDATES[-1]}+ scale explains it)")


def pack(w: torch.Tensor, layout: TernaryLayout | None = None, name: str = "weight") -> PackedTernary:
    """Pack a fake-quantized weight (N, K) into 2-bit codes and fp32 scales."""
    layout = layout or detect_layout(w, name)
    N, K = w.shape
    w = w.float()
    g = layout.group_size
    groups = w.reshape(N, K // g, g)
    scales = groups.abs().amax(dim=-1)  # (N, K / g); an all-zero group keeps scale 0
    if layout.kind == "tensor":
        scales = scales.amax().expand(N, 1).clone()
    trits = torch.sign(groups).to(torch.int8).reshape(N, K)
    codes = torch.where(trits < 0, 2, trits).to(torch.uint8)  # 0 -> 0, +1 -> 1, -1 -> 2
    k_pad = -(-K // TILE) * TILE
    codes = torch.nn.functional.pad(codes, (0, k_pad - K))
    planes = codes.view(N, k_pad // TILE, 4, PLANE)  # (N, tiles, s, i): weight t*128 + 32*s + i
    packed = planes[:, :, 0] | planes[:, :, 1] << 2 | planes[:, :, 2] << 4 | planes[:, :, 3] << 6
    return PackedTernary(packed.reshape(N, k_pad // 4).contiguous(), scales.contiguous(), K, layout)


def unpack(p: PackedTernary) -> torch.Tensor:
    """The dense fp32 weight (N, K) that p encodes."""
    N = p.out_features
    tiles = p.packed.view(N, -1, 1, PLANE)  # (N, tiles, 1, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    codes = (tiles >> shifts) & 3  # (N, tiles, 4, 32)
    trits = (codes == 1).float() - (codes == 2).float()
    trits = trits.reshape(N, -1)[:, :p.in_features]
    scale = p.scales.repeat_interleave(p.layout.group_size, dim=1) if p.layout.kind == "group" else p.scales
    return trits * scale


def ternary_linear_ref(x: torch.Tensor, p: PackedTernary) -> torch.Tensor:
    """y = x @ W^T with W from packed codes and scales; fp32 accumulation, output in x's dtype."""
    return (x.float() @ unpack(p).T).to(x.dtype)


def weight_bytes(p: PackedTernary) -> int:
    """Bytes a matmul reads for the weight: codes plus fp32 scales."""
    return p.packed.numel() + p.scales.numel() * 4
