"""Triton kernels for the rest of InfLLM v2's selection, so the TensorRT plugin needs no torch on the device:
key compression, and block pooling + top-k with the reference's tie rule (lower block index first).

Their definitions are reference.compress_keys, reference.block_scores and reference.select_blocks (revision
2: reference.compress_coarse_keys, the same compression kernel with lse_kernel_size/stride, and
reference.select_blocks_rev2); the tests compare against those in Triton's interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trt_plugins import plans
from trt_plugins.attention.config import InfLLMv2Config
from trt_plugins.executors import DTYPE_NAMES, run_launch
from trt_plugins.plans import Ptr


@triton.jit
def compress_keys_kernel(
        K, KC, POS,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_cb, stride_ch, stride_cj, stride_cd,
        stride_pb, stride_pt,
        n_kv_heads, n_kernels, n_tokens, kernel_size, kernel_stride,
        HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr):
    """KC[b, h, j] = mean(K[b, h, j*stride : j*stride + kernel_size]) in fp32 for the kernels this call's
    positions complete: j from n_vis(POS[b, 0] - 1) to n_vis(POS[b, n_tokens - 1]) - 1, where n_vis(p)
    counts the kernels whose last key is <= p. Earlier kernels are kept from earlier calls (the state)."""
    b = tl.program_id(1) // n_kv_heads
    h = tl.program_id(1) % n_kv_heads
    p0 = tl.load(POS + b * stride_pb) - 1
    p1 = tl.load(POS + b * stride_pb + (n_tokens - 1) * stride_pt)
    first = tl.where(p0 >= kernel_size - 1, (p0 - kernel_size + 1) // kernel_stride + 1, 0)
    last = tl.minimum(tl.where(p1 >= kernel_size - 1, (p1 - kernel_size + 1) // kernel_stride + 1, 0), n_kernels)
    d = tl.arange(0, HEAD_DIM)
    base = K + b * stride_kb + h * stride_kh + d[None, :] * stride_kd
    for j0 in range(first + tl.program_id(0) * BLOCK_J, last, tl.num_programs(0) * BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        live = j < last
        acc = tl.zeros([BLOCK_J, HEAD_DIM], tl.float32)
        for i in range(0, kernel_size):
            acc += tl.load(base + (j * kernel_stride + i)[:, None] * stride_ks, mask=live[:, None],
                           other=0.0).to(tl.float32)
        tl.store(KC + b * stride_cb + h * stride_ch + j[:, None] * stride_cj + d[None, :] * stride_cd,
                 acc / kernel_size, mask=live[:, None])


@triton.jit
def select_blocks_kernel(
        S, POS, IDX, CNT,
        stride_sb, stride_sh, stride_st, stride_sj,
        stride_pb, stride_pt,
        stride_ib, stride_ih, stride_it, stride_ii,
        stride_cb, stride_ch, stride_ct,
        n_kv_heads, n_kernels, n_tokens, n_blocks, block_size, kernel_size, kernel_stride, init_blocks,
        window_blocks, n_pick, dense_len,
        RATIO: tl.constexpr, NB_PAD: tl.constexpr, REVISION: tl.constexpr = 1):
    """Blocks one token attends, ascending, into IDX[b, h, t, :] with their count in CNT[b, h, t].

    B[blk] = max(S[j]) for j in blk*RATIO - 1 .. blk*RATIO + RATIO - 1 over the visible kernels; then the init
    blocks, the window ending at the token's own block, and the n_pick best blocks before the window (equal
    scores: the lower block first). REVISION 2 (MiniCPM4.1): n_pick places over every block, the init blocks
    and the window (own block and window_blocks before it) taken first, then blocks after the own block
    dropped, so the count may fall short of n_pick. A row whose kv length (its last position + 1) is below dense_len attends
    densely: nothing is selected or written (block attention visits every block itself). NB_PAD (a power of
    two >= n_blocks) is the only size compiled in, with RATIO. Positions of a call ascend within a row, so its
    last token holds the row's largest position.
    """
    t = tl.program_id(0)
    b = tl.program_id(1) // n_kv_heads
    h = tl.program_id(1) % n_kv_heads
    pos = tl.load(POS + b * stride_pb + t * stride_pt)
    last = tl.load(POS + b * stride_pb + (n_tokens - 1) * stride_pt)
    if last + 1 >= dense_len:
        n_vis = tl.where(pos >= kernel_size - 1, (pos - kernel_size + 1) // kernel_stride + 1, 0)
        n_vis = tl.minimum(n_vis, n_kernels)
        own = pos // block_size
        blk = tl.arange(0, NB_PAD)
        s_base = S + b * stride_sb + h * stride_sh + t * stride_st
        score = tl.zeros([NB_PAD], tl.float32)  # scores are >= 0; 0 where no visible kernel overlaps
        for i in tl.static_range(RATIO + 1):
            j = blk * RATIO - 1 + i
            score = tl.maximum(score, tl.load(s_base + j * stride_sj, mask=(j >= 0) & (j < n_vis), other=0.0))
        causal = blk <= own
        if REVISION == 2:
            # The reference scores forced blocks +inf: they take the first places (at most init + window + 1
            # <= n_pick of them), the rest go to the best others of all blocks, future ones included.
            chosen = (blk < n_blocks) & ((blk < init_blocks) | (causal & (blk >= own - window_blocks)))
            ranked = tl.where((blk < n_blocks) & ~chosen, score, float("-inf"))
            n_left = n_pick - tl.sum(chosen.to(tl.int32), axis=0)
        else:
            chosen = causal & ((blk < init_blocks) | (blk > own - window_blocks))
            candidate = (blk <= own - window_blocks) & (blk >= init_blocks) & (blk < n_blocks)
            ranked = tl.where(candidate, score, float("-inf"))
            n_left = n_pick
        for _ in range(n_left):
            best = tl.max(ranked, axis=0)
            first = tl.min(tl.where(ranked == best, blk, NB_PAD), axis=0)  # equal scores: the lower block
            take = (blk == first) & (ranked > float("-inf"))  # nothing left to rank: take nothing
            chosen = chosen | take
            ranked = tl.where(take, float("-inf"), ranked)
        if REVISION == 2:
            chosen = chosen & causal  # blocks after the own block may have taken places: dropped
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1  # ascending order of the chosen blocks
        tl.store(IDX + b * stride_ib + h * stride_ih + t * stride_it + slot * stride_ii, blk, mask=chosen)
        tl.store(CNT + b * stride_cb + h * stride_ch + t * stride_ct, tl.sum(chosen.to(tl.int32), axis=0))


def compress_keys(k: torch.Tensor, cfg: InfLLMv2Config, n_kernels: int | None = None) -> torch.Tensor:
    """Triton version of reference.compress_keys: (B, Hkv, NK, D) fp32, every kernel of the cache (the
    incremental launch of the plugin's plan, given positions 0 .. S-1)."""
    B, Hkv, S, D = k.shape
    nk = plans.n_kernels(cfg, S) if n_kernels is None else n_kernels
    kc = torch.empty(B, Hkv, nk, D, device=k.device, dtype=torch.float32)
    if nk:
        pos = torch.tensor([[0, S - 1]], dtype=torch.int64, device=k.device).expand(B, 2).contiguous()
        append_compressed_keys_(kc, k, pos, cfg)
    return kc


def compress_coarse_keys(k: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """Triton version of reference.compress_coarse_keys (revision 2): (B, Hkv, NK2, D) fp32."""
    B, Hkv, S, D = k.shape
    kc2 = torch.empty(B, Hkv, plans.n_coarse_kernels(cfg, S), D, device=k.device, dtype=torch.float32)
    if kc2.shape[2]:
        pos = torch.tensor([[0, S - 1]], dtype=torch.int64, device=k.device).expand(B, 2).contiguous()
        append_compressed_keys_(kc2, k, pos, cfg, coarse=True)
    return kc2


def append_compressed_keys_(kc: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                            cfg: InfLLMv2Config, coarse: bool = False) -> torch.Tensor:
    """In place: the compressed keys completed by `positions` (B, T), consecutive per row, from k (B, Hkv, S, D);
    coarse: revision 2's coarse keys (lse_kernel_size keys every lse_kernel_stride) instead."""
    B, Hkv, S, D = k.shape
    pos = positions.to(torch.int64).contiguous()
    launch = plans.compress_keys_launch(Ptr("k"), k.stride(), Ptr("kc"), kc.stride(), Ptr("pos"), pos.stride(),
                                        batch=B, kv_heads=Hkv, tokens=pos.shape[1], kernels=kc.shape[2],
                                        head_dim=D, dtype=DTYPE_NAMES[k.dtype], cfg=cfg, coarse=coarse)
    run_launch(launch, {"k": k, "kc": kc, "pos": pos})
    return kc


def max_selected(cfg: InfLLMv2Config, n_blocks: int) -> int:
    """Width of a block list: init + top-k + window (dense rows are not listed)."""
    return min(n_blocks, cfg.max_selected)


def select_blocks(scores: torch.Tensor, q_pos: torch.Tensor, cfg: InfLLMv2Config, n_blocks: int):
    """Block lists (B, Hkv, T, width) int32 ascending, and their counts (B, Hkv, T) int32, by cfg.revision's
    rule; rows below dense_len get count 0 here (they attend densely without a list)."""
    B, Hkv, T, NK = scores.shape
    pos = q_pos.to(torch.int64).contiguous()
    width = max_selected(cfg, n_blocks)
    idx = torch.zeros(B, Hkv, T, width, device=scores.device, dtype=torch.int32)
    cnt = torch.zeros(B, Hkv, T, device=scores.device, dtype=torch.int32)
    launch = plans.select_launch(Ptr("s"), scores.stride(), Ptr("pos"), pos.stride(), Ptr("idx"), idx.stride(),
                                 Ptr("cnt"), cnt.stride(), batch=B, tokens=T, kv_heads=Hkv, kernels=NK,
                                 blocks=n_blocks, cfg=cfg)
    run_launch(launch, {"s": scores, "pos": pos, "idx": idx, "cnt": cnt})
    return idx, cnt
