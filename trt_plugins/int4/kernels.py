"""Triton W4A16 GEMV/GEMM from nibble-packed 4-bit weights (layout: reference.py), fp32 accumulation.

Decode (M = 1..8 rows) reads the weight once per token: 4-bit codes and their scales are 3.6-3.9x fewer
bytes than fp16 (groups of 32-128). Each program owns BLOCK_N output features and BLOCK_M rows, and walks K
in steps within one quantization group: a step's bytes hold the even inputs in their low nibbles and the odd ones in their high nibbles, so the
tile is two tl.dot's — even x columns against low nibbles, odd against high — with no shuffle. Codes minus
the zero point are small integers, exact in fp16/bf16; the group's scale multiplies the fp32 partial sum.
The plan (trt_plugins/plans.py: int4_plan) picks the tiles: a GEMV tile for M <= 8 (M padded to 16,
tl.dot's minimum, narrow in N for many programs), a GEMM tile for prefill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trt_plugins import plans
from trt_plugins.executors import DTYPE_NAMES, run_triton
from trt_plugins.int4.reference import PackedInt4


@triton.jit
def int4_matmul_kernel(
        X, QW, S, Z, Y, M, N, K,
        stride_xm, stride_xk, stride_qn, stride_qk, stride_sn, stride_sg, stride_zn, stride_zg,
        stride_ym, stride_yn,
        GROUP: tl.constexpr,      # inputs per quantization group (32, 64 or 128)
        HAS_ZEROS: tl.constexpr,  # False: symmetric, zero point 8; Z is not read
        BLOCK_M: tl.constexpr,    # rows of X per program (16: decode, tl.dot's minimum)
        BLOCK_N: tl.constexpr,    # output features per program
        BLOCK_K: tl.constexpr,    # inputs per step, a divisor of GROUP (one scale and zero point per row)
        UPCAST: tl.constexpr):    # dot in fp32 (Triton's interpreter reads bf16 dot operands wrongly)
    """Y[m, n] = sum_k X[m, k] * (code[n, k] - zero[n, k // GROUP]) * scale[n, k // GROUP]."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.arange(0, BLOCK_K // 2)  # byte j of a step: inputs 2j (low nibble) and 2j + 1 (high nibble)
    n_ok, m_ok = rn < N, rm < M
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for t in range(0, K // BLOCK_K):
        g = t // (GROUP // BLOCK_K)  # the quantization group of this step
        codes = tl.load(QW + rn[:, None] * stride_qn + (t * (BLOCK_K // 2) + j)[None, :] * stride_qk,
                        mask=n_ok[:, None], other=0)  # (BLOCK_N, BLOCK_K / 2) uint8
        if HAS_ZEROS:
            zbyte = tl.load(Z + rn * stride_zn + (g // 2) * stride_zg, mask=n_ok, other=0)
            zero = ((zbyte >> ((g % 2) * 4)) & 15).to(tl.int32)
        else:
            zero = tl.full([BLOCK_N], 8, tl.int32)
        k_even = t * BLOCK_K + 2 * j
        x_even = tl.load(X + rm[:, None] * stride_xm + k_even[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
        x_odd = tl.load(X + rm[:, None] * stride_xm + (k_even + 1)[None, :] * stride_xk, mask=m_ok[:, None],
                        other=0.0)
        if UPCAST:
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
        w_even = ((codes & 15).to(tl.int32) - zero[:, None]).to(x_even.dtype)  # -15..15: exact
        w_odd = ((codes >> 4).to(tl.int32) - zero[:, None]).to(x_even.dtype)
        part = tl.dot(x_even, tl.trans(w_even), input_precision="ieee")
        part = tl.dot(x_odd, tl.trans(w_odd), part, input_precision="ieee")  # (BLOCK_M, BLOCK_N) fp32
        scale = tl.load(S + rn * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)
        acc += part * scale[None, :]
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def int4_linear(x: torch.Tensor, p: PackedInt4) -> torch.Tensor:
    """y = x[..., perm] @ W^T for x (..., K) in fp16/bf16/fp32 (scales in x's dtype); y has x's dtype.
    The CpmInt4Gemm plugin's plan (the permutation, when there is one, is a gather before the plugin)."""
    if x.shape[-1] != p.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the int4 weight expects {p.in_features}")
    if p.scales.dtype != x.dtype:
        raise ValueError(f"int4 scales are {p.scales.dtype}, x is {x.dtype}: convert the layer to x's dtype")
    if p.perm is not None:
        x = x.index_select(-1, p.perm)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M, K = x2.shape
    N = p.out_features
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    plan = plans.int4_plan(M, N, K, p.group_size, p.zeros is not None, DTYPE_NAMES[x.dtype])
    tensors = {"x": x2, "qweight": p.qweight.contiguous(), "scales": p.scales.contiguous(), "y": y}
    if p.zeros is not None:
        tensors["zeros"] = p.zeros.contiguous()
    run_triton(plan, tensors)
    return y.reshape(*x.shape[:-1], N)
