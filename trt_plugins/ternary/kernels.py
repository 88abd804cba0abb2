"""Triton ternary GEMM/GEMV from packed 2-bit weights (layout: reference.py), fp32 accumulation.

Decode (M = 1..8 rows) is the case that matters on an edge device: the weight read dominates, and 2-bit
codes read 8x fewer bytes than fp16. Each program owns BLOCK_N output features and walks K one 128-weight
tile (32 bytes per row) at a time; the four 2-bit planes of a tile are four runs of 32 consecutive inputs,
so unpacking is a shift and a mask, and each plane is one tl.dot (M padded to 16, tl.dot's minimum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trt_plugins import plans
from trt_plugins.executors import DTYPE_NAMES, run_triton
from trt_plugins.ternary.reference import PLANE, PackedTernary

@triton.jit
def ternary_matmul_kernel(
        X, P, S, Y, M, N, K, n_tiles,
        stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg, stride_ym, stride_yn,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Y[m, n] = sum_k X[m, k] * trit[n, k] * scale[n, k // GROUP]  (GROUP = 0: one scale per row)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(0, n_tiles):
        codes_all = tl.load(P + rn[:, None] * stride_pn + (t * 32 + i)[None, :] * stride_pk,
                            mask=rn[:, None] < N, other=0)  # (BLOCK_N, 32) uint8
        for s in tl.static_range(4):
            k = t * 128 + s * 32 + i
            x = tl.load(X + rm[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
            codes = (codes_all >> (2 * s)) & 3
            w = (codes == 1).to(x.dtype) - (codes == 2).to(x.dtype)  # (BLOCK_N, 32): -1, 0, +1
            part = tl.dot(x, tl.trans(w), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
            if GROUP > 0:
                group = tl.minimum(t * 128 + s * 32, K - 1) // GROUP  # padding planes reuse the last group
                scale = tl.load(S + rn * stride_sn + group * stride_sg, mask=rn < N, other=0.0)
                acc += part * scale[None, :]
            else:
                acc += part
    if GROUP == 0:
        acc *= tl.load(S + rn * stride_sn, mask=rn < N, other=0.0)[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def ternary_linear(x: torch.Tensor, p: PackedTernary) -> torch.Tensor:
    """y = x @ W^T for x (..., K) in fp16/bf16/fp32; y has x's dtype. The CpmTernaryGemm plugin's plan."""
    if x.shape[-1] != p.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the packed weight expects {p.in_features}")
    if p.layout.kind == "group" and p.layout.group_size % PLANE:
        raise ValueError(f"group size {p.layout.group_size} is not a multiple of {PLANE}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x2.shape
    N = p.out_features
    scales = p.scales.reshape(N, -1).contiguous()  # per tensor / per row: one column
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    plan = plans.ternary_plan(M, N, K, p.packed.shape[1], scales.shape[1],
                              p.layout.group_size if p.layout.kind == "group" else 0, DTYPE_NAMES[x.dtype])
    run_triton(plan, {"x": x2, "packed": p.packed.contiguous(), "scales": scales, "y": y})
    return y.reshape(*x.shape[:-1], N)
