"""CPU stand-ins for the CUDA kernels MiniCPM4.1's modeling code calls, written for the tests (not upstream code).

Each has the signature of the upstream Python wrapper (OpenBMB/infllmv2_cuda_impl infllm_v2/*.py, flash_attn)
and the semantics of that repository's own torch/Triton references (vendored beside this folder in
tests/official/infllmv2_cuda_impl/); tests/test_infllm_v2_rev2.py checks each against them. fp32 throughout.
"""
from __future__ import annotations

import torch

STAGE1_STRIDE = 16  # the stage-1 kernel's hard-coded kernel stride (its causal border: (i - 15) // 16)
STAGE1_LSE_STRIDE = 64  # ... and of the coarse keys that give the softmax normaliser ((i - 63) // 64)
STAGE2_BLOCK = 64  # infllmv2_attn_varlen_func: topk_idx counts blocks of 64 keys (N_BLOCK_DIM=64)


def _rows(cu: torch.Tensor, b: int) -> slice:
    return slice(int(cu[b]), int(cu[b + 1]))


def infllmv2_attn_stage1(q, k, v, cu_seqlens_q, cu_seqlens_k, cu_seqlens_v, max_seqlen_q, max_seqlen_k,
                         dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """Scores (Hkv, total_q, max_seqlen_k): sum over each GQA group of exp(q.k[j] * scale - LSE), LSE over
    the coarse keys v; causal rows see kernels j < (i - 15) // 16 and coarse keys j < (i - 63) // 64
    (row i = the query's index in its sequence); a row with no coarse key scores 0 (the reference's online
    softmax turns it into NaN, set to 0). q (total_q, H, D), k (total_k, Hkv, D) kernels,
    v (total_v, Hkv, D) coarse kernels."""
    H, D = q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    out = torch.zeros(Hkv, q.shape[0], max_seqlen_k, dtype=torch.float32)
    for b in range(cu_seqlens_q.numel() - 1):
        rq, rk, rv = _rows(cu_seqlens_q, b), _rows(cu_seqlens_k, b), _rows(cu_seqlens_v, b)
        qb = q[rq].float().view(-1, Hkv, H // Hkv, D)  # (T, Hkv, G, D)
        kb, vb = k[rk].float(), v[rv].float()  # (NK, Hkv, D), (NK2, Hkv, D)
        s1 = torch.einsum("thgd,jhd->hgtj", qb, kb) * scale  # (Hkv, G, T, NK)
        s2 = torch.einsum("thgd,jhd->hgtj", qb, vb) * scale  # (Hkv, G, T, NK2)
        i = torch.arange(qb.shape[0])[:, None]
        seen1 = torch.arange(kb.shape[0])[None] < ((i - STAGE1_STRIDE + 1) // STAGE1_STRIDE).clamp_min(0)
        seen2 = torch.arange(vb.shape[0])[None] < ((i - STAGE1_LSE_STRIDE + 1) // STAGE1_LSE_STRIDE).clamp_min(0)
        if not causal:
            seen1, seen2 = torch.ones_like(seen1), torch.ones_like(seen2)
        lse = s2.masked_fill(~seen2, float("-inf")).logsumexp(dim=-1, keepdim=True)  # (Hkv, G, T, 1)
        p = torch.exp(s1 - lse).masked_fill(~seen1, 0.0)  # rows with no coarse key: exp(x + inf) = inf
        out[:, rq, :kb.shape[0]] = p.sum(dim=1).masked_fill(~seen2.any(dim=-1)[None, :, None], 0.0)  # NaN -> 0
    return out


def max_pooling_1d_varlen(input, cu_seqlens_q, cu_seqlens_k, cache_lens, max_seqlen_q, max_seqlen_k,
                          local_blocks, init_blocks, block_size=64, stride=16):
    """csrc/max_pooling_1d.cuh max_pooling_1d_varlen_kernel: block k takes the max of scores k*r-1 ..
    k*r+r-1 (r = block_size // stride) within the sequence's kernels (-inf if none); +inf where
    k < init_blocks or own - local_blocks <= k <= own (own = (row + cache_len) // block_size).
    (H, total_q, max_k) -> (H, total_q, out_len), out_len = ceil((max_seqlen_q + max cache_len) / block_size)."""
    r = block_size // stride
    H, total_q = input.shape[0], input.shape[1]
    out_len = -(-(max_seqlen_q + int(cache_lens.max())) // block_size)
    out = torch.zeros(H, total_q, out_len, dtype=input.dtype)
    blk = torch.arange(out_len)
    for b in range(cu_seqlens_q.numel() - 1):
        rq = _rows(cu_seqlens_q, b)
        seqlen_k = int(cu_seqlens_k[b + 1] - cu_seqlens_k[b])
        scores = input[:, rq]  # (H, T, max_k)
        padded = torch.full((H, scores.shape[1], out_len * r + 1), float("-inf"), dtype=input.dtype)
        take = min(seqlen_k, out_len * r)
        padded[..., 1:1 + take] = scores[..., :take]
        pooled = padded.unfold(-1, r + 1, r).amax(dim=-1)  # (H, T, out_len)
        own = ((torch.arange(scores.shape[1]) + int(cache_lens[b])) // block_size)[:, None]  # (T, 1)
        forced = (blk < init_blocks) | ((own >= blk) & (own <= blk + local_blocks))  # (T, out_len)
        out[:, rq] = pooled.masked_fill(forced, float("inf"))
    return out


def _attention(q, k, v, allowed, scale):
    """Softmax attention of q (T, H, D) over k, v (S, Hkv, D) where allowed (Hkv or H, T, S); fully
    masked rows give 0 (as flash attention does)."""
    H, D = q.shape[1], q.shape[2]
    g = H // k.shape[1]
    kk, vv = k.float().repeat_interleave(g, dim=1), v.float().repeat_interleave(g, dim=1)  # (S, H, D)
    s = torch.einsum("thd,shd->hts", q.float(), kk) * scale
    if allowed.shape[0] != H:
        allowed = allowed.repeat_interleave(g, dim=0)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hts,shd->thd", p, vv)


def _causal(T: int, S: int) -> torch.Tensor:
    """flash attention's bottom-right aligned causal mask (T, S): key s visible to row t iff s <= t + S - T."""
    return torch.arange(S)[None] <= torch.arange(T)[:, None] + (S - T)


def infllmv2_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                              softmax_scale=None, causal=False, topk_idx=None, **_):
    """Block-sparse varlen attention: row t of a sequence attends the keys of the 64-key blocks listed in
    topk_idx (Hkv, total_q, k) (-1 = none), causal bottom-right when causal. Out (total_q, H, D)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b in range(cu_seqlens_q.numel() - 1):
        rq, rk = _rows(cu_seqlens_q, b), _rows(cu_seqlens_k, b)
        T, S = rq.stop - rq.start, rk.stop - rk.start
        n_blocks = -(-S // STAGE2_BLOCK)
        idx = topk_idx[:, rq].long()  # (Hkv, T, k)
        chosen = torch.zeros(idx.shape[0], T, n_blocks + 1, dtype=torch.bool)
        chosen.scatter_(-1, torch.where(idx < 0, n_blocks, idx), True)  # -1 goes to a spare column
        allowed = chosen[..., :n_blocks].repeat_interleave(STAGE2_BLOCK, dim=-1)[..., :S]  # (Hkv, T, S)
        if causal:
            allowed = allowed & _causal(T, S)
        out[rq] = _attention(q[rq], k[rk], v[rk], allowed, scale)
    return out.to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, **_):
    """Dense varlen GQA attention, causal bottom-right when causal. Out (total_q, H, D)."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b in range(cu_seqlens_q.numel() - 1):
        rq, rk = _rows(cu_seqlens_q, b), _rows(cu_seqlens_k, b)
        T, S = rq.stop - rq.start, rk.stop - rk.start
        allowed = _causal(T, S) if causal else torch.ones(T, S, dtype=torch.bool)
        out[rq] = _attention(q[rq], k[rk], v[rk], allowed.expand(k.shape[1], T, S), scale)
    return out.to(q.dtype)


def index_first_axis(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """flash_attn.bert_padding.index_first_axis: x[indices] along the first axis."""
    return x[indices]


__all__ = ["infllmv2_attn_stage1", "max_pooling_1d_varlen", "infllmv2_attn_varlen_func", "flash_attn_varlen_func",
           "index_first_axis"]
