"""Triton kernels for the rest of InfLLM v2's selection, so the TensorRT plugin needs no torch on the device:
key compression, and block pooling + top-k with the reference's tie rule (lower block index first).

Their definitions are reference.compress_keys, reference.block_scores and reference.select_blocks; the tests
compare against those in Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trt_plugins.attention.config import InfLLMv2Config

SELECT_WARPS = 4
COMPRESS_BLOCK_J = 16  # kernels averaged per program


@triton.jit
def compress_keys_kernel(
        K, KC,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_cb, stride_ch, stride_cj, stride_cd,
        n_kv_heads, n_kernels, kernel_size, kernel_stride,
        HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr):
    """KC[b, h, j] = mean(K[b, h, j*stride : j*stride + kernel_size]) in fp32, for BLOCK_J kernels a program."""
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    b = tl.program_id(1) // n_kv_heads
    h = tl.program_id(1) % n_kv_heads
    d = tl.arange(0, HEAD_DIM)
    live = j < n_kernels
    acc = tl.zeros([BLOCK_J, HEAD_DIM], tl.float32)
    base = K + b * stride_kb + h * stride_kh + d[None, :] * stride_kd
    for i in range(0, kernel_size):
        acc += tl.load(base + (j * kernel_stride + i)[:, None] * stride_ks, mask=live[:, None], other=0.0).to(tl.float32)
    tl.store(KC + b * stride_cb + h * stride_ch + j[:, None] * stride_cj + d[None, :] * stride_cd,
             acc / kernel_size, mask=live[:, None])


@triton.jit
def select_blocks_kernel(
        S, POS, IDX, CNT,
        stride_sb, stride_sh, stride_st, stride_sj,
        stride_pb, stride_pt,
        stride_ib, stride_ih, stride_it, stride_ii,
        stride_cb, stride_ch, stride_ct,
        n_kv_heads, n_kernels, n_tokens, n_blocks, block_size, init_blocks, window_blocks, n_pick, dense_len,
        RATIO: tl.constexpr, NB_PAD: tl.constexpr):
    """Blocks one token attends, ascending, into IDX[b, h, t, :] with their count in CNT[b, h, t].

    B[blk] = max(S[j]) for j in blk*RATIO - 1 .. blk*RATIO + RATIO - 1; then the init blocks, the window
    ending at the token's own block, and the n_pick best blocks before the window (equal scores: the lower
    block first). A row whose kv length (its last position + 1) is below dense_len takes every block up to
    its own. NB_PAD (a power of two >= n_blocks) is the only size compiled in, with RATIO. Positions of a call ascend within a row, so its last token holds the row's largest position.
    """
    t = tl.program_id(0)
    b = tl.program_id(1) // n_kv_heads
    h = tl.program_id(1) % n_kv_heads
    pos = tl.load(POS + b * stride_pb + t * stride_pt)
    last = tl.load(POS + b * stride_pb + (n_tokens - 1) * stride_pt)
    own = pos // block_size
    blk = tl.arange(0, NB_PAD)
    s_base = S + b * stride_sb + h * stride_sh + t * stride_st
    score = tl.zeros([NB_PAD], tl.float32)  # scores are >= 0; 0 where no kernel overlaps
    for i in tl.static_range(RATIO + 1):
        j = blk * RATIO - 1 + i
        score = tl.maximum(score, tl.load(s_base + j * stride_sj, mask=(j >= 0) & (j < n_kernels), other=0.0))
    causal = blk <= own
    chosen = causal & ((blk < init_blocks) | (blk > own - window_blocks))
    if last + 1 < dense_len:
        chosen = causal
    else:
        candidate = (blk <= own - window_blocks) & (blk >= init_blocks) & (blk < n_blocks)
        ranked = tl.where(candidate, score, float("-inf"))
        for _ in range(n_pick):
            best = tl.max(ranked, axis=0)
            first = tl.min(tl.where(ranked == best, blk, NB_PAD), axis=0)  # equal scores: the lower block
            take = (blk == first) & (ranked > float("-inf"))  # nothing left to rank: take nothing
            chosen = chosen | take
            ranked = tl.where(take, float("-inf"), ranked)
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1  # ascending order of the chosen blocks
    tl.store(IDX + b * stride_ib + h * stride_ih + t * stride_it + slot * stride_ii, blk, mask=chosen)
    tl.store(CNT + b * stride_cb + h * stride_ch + t * stride_ct, tl.sum(chosen.to(tl.int32), axis=0))


def compress_keys(k: torch.Tensor, cfg: InfLLMv2Config, n_kernels: int | None = None) -> torch.Tensor:
    """Triton version of reference.compress_keys: (B, Hkv, NK, D) fp32."""
    B, Hkv, S, D = k.shape
    nk = max(0, (S - cfg.kernel_size) // cfg.kernel_stride + 1) if n_kernels is None else n_kernels
    kc = torch.empty(B, Hkv, nk, D, device=k.device, dtype=torch.float32)
    if nk:
        compress_keys_kernel[(triton.cdiv(nk, COMPRESS_BLOCK_J), B * Hkv)](
            k, kc, *k.stride(), *kc.stride(), Hkv, nk, cfg.kernel_size, cfg.kernel_stride, HEAD_DIM=D,
            BLOCK_J=COMPRESS_BLOCK_J)
    return kc


def nb_pad(n_blocks: int) -> int:
    """The compiled width of a score row: a power of two, at least 16."""
    return triton.next_power_of_2(max(n_blocks, 16))


def max_selected(cfg: InfLLMv2Config, n_blocks: int, dense_possible: bool) -> int:
    """Width of the block list: every block when a row may still be dense, else init + top-k + window."""
    return n_blocks if dense_possible else min(n_blocks, cfg.max_selected)


def select_blocks(scores: torch.Tensor, q_pos: torch.Tensor, cfg: InfLLMv2Config, n_blocks: int):
    """Block lists (B, Hkv, T, width) int32 ascending, and their counts (B, Hkv, T) int32."""
    B, Hkv, T, NK = scores.shape
    pos = q_pos.to(torch.int64).contiguous()
    width = max_selected(cfg, n_blocks, bool((pos[:, -1] + 1 < cfg.dense_len).any()))
    idx = torch.empty(B, Hkv, T, width, device=scores.device, dtype=torch.int32)
    cnt = torch.empty(B, Hkv, T, device=scores.device, dtype=torch.int32)
    select_blocks_kernel[(T, B * Hkv)](
        scores, pos, idx, cnt, *scores.stride(), *pos.stride(), *idx.stride(), *cnt.stride(),
        Hkv, NK, T, n_blocks, cfg.block_size, cfg.init_blocks, cfg.window_blocks, cfg.topk - cfg.init_blocks,
        cfg.dense_len, RATIO=cfg.block_size // cfg.kernel_stride, NB_PAD=nb_pad(n_blocks), num_warps=SELECT_WARPS)
    return idx, cnt
