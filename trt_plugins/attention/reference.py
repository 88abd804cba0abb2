"""Attention, the definition: dense causal GQA attention and InfLLM v2 sparse block attention, in torch.

Every other implementation (Triton kernels, the TensorRT plugin, the ONNX portable graph) is tested
against these functions. Semantics of InfLLM v2 (MiniCPM4, June 2025) are written out in README.md beside
this file; its second revision (MiniCPM4.1, cfg.revision == 2) is the section at the end of this file and
in docs/model.md. Shapes: q (B, H, T, D); k, v (B, Hkv, S, D) the whole cache; q_pos (B, T) the position of each
query. Key j of a row is visible to a query at position p iff j <= p.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from trt_plugins.attention.config import InfLLMv2Config


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  block_mask: Optional[torch.Tensor] = None, block_size: int = 0) -> torch.Tensor:
    """Causal GQA softmax attention, softmax in fp32; with block_mask (B, Hkv, T, NB) only keys of the
    selected blocks of block_size tokens take part (one selection per GQA group)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    qg = q.view(B, Hkv, group, T, D)
    scores = torch.einsum("bhgtd,bhsd->bhgts", qg.float(), k.float()) / math.sqrt(D)  # (B, Hkv, G, T, S)
    visible = torch.arange(S, device=q.device)[None, None, :] <= q_pos[:, :, None]  # (B, T, S)
    visible = visible[:, None, None]  # (B, 1, 1, T, S)
    if block_mask is not None:
        token_mask = block_mask.repeat_interleave(block_size, dim=-1)[..., :S]  # (B, Hkv, T, S)
        visible = visible & token_mask[:, :, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, v)  # (B, Hkv, G, T, D)
    return out.reshape(B, H, T, D)


# --- InfLLM v2 ----------------------------------------------------------------------------------------
def visible_chunks(q_pos: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """How many chunk means (chunk j = keys [j*stride, j*stride + size)) a query at each position may see:
    chunk j is visible once it has ended, j*stride + size - 1 <= t."""
    return torch.div(q_pos - size + 1, stride, rounding_mode="floor").add(1).clamp_min(0)


def visible_kernels(q_pos: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """How many compressed keys (kernels of kernel_size keys every kernel_stride) a query may see."""
    return visible_chunks(q_pos, cfg.kernel_size, cfg.kernel_stride)


def chunk_means(k: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """The mean of each chunk of `size` keys, every `stride` keys.
    k (B, Hkv, S, D) -> (B, Hkv, NK, D) fp32, NK = (S - size) // stride + 1."""
    if k.shape[2] < size:
        return k.new_zeros(k.shape[0], k.shape[1], 0, k.shape[3], dtype=torch.float32)
    chunks = k.float().unfold(2, size, stride)  # (B, Hkv, NK, D, size)
    return chunks.mean(dim=-1)


def compress_keys(k: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """Semantic kernels without parameters: chunk means of kernel_size keys every kernel_stride keys."""
    return chunk_means(k, cfg.kernel_size, cfg.kernel_stride)


def append_chunk_means(kc: torch.Tensor, k: torch.Tensor, old_len: int, new_len: int, size: int,
                       stride: int) -> torch.Tensor:
    """Decode's incremental form of chunk_means: the chunks completed by keys old_len..new_len-1.

    kc (B, Hkv, NKmax, D) is updated in place and returned. The keys not yet in a chunk (the 'tail' of
    at most `size` keys) live in the KV cache itself, so no separate tail buffer is needed.
    """
    first = visible_chunks(torch.tensor(old_len - 1), size, stride).item() if old_len > 0 else 0
    last = min(visible_chunks(torch.tensor(new_len - 1), size, stride).item(), kc.shape[2])
    for j in range(first, last):
        start = j * stride
        kc[:, :, j] = k[:, :, start:start + size].float().mean(dim=2)
    return kc


def append_compressed_keys(kc: torch.Tensor, k: torch.Tensor, old_len: int, new_len: int,
                           cfg: InfLLMv2Config) -> torch.Tensor:
    """append_chunk_means for the kernels of compress_keys."""
    return append_chunk_means(kc, k, old_len, new_len, cfg.kernel_size, cfg.kernel_stride)


def update_chunk_means(kc: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, size: int,
                       stride: int) -> torch.Tensor:
    """The chunk-mean state after a call at positions q_pos (B, T), consecutive per row: a copy of kc
    (B, Hkv, NK, D) with the chunks those positions complete computed from the cache k (B, Hkv, S, D)
    that already holds this call's keys. Chunks outside that range keep their values from earlier calls."""
    out = kc.clone()
    for b in range(q_pos.shape[0]):
        first, last = int(q_pos[b, 0]), int(q_pos[b, -1]) + 1
        out[b:b + 1] = append_chunk_means(out[b:b + 1], k[b:b + 1], first, last, size, stride)
    return out


def update_compressed_keys(kc: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor,
                           cfg: InfLLMv2Config) -> torch.Tensor:
    """update_chunk_means for the kernels of compress_keys."""
    return update_chunk_means(kc, k, q_pos, cfg.kernel_size, cfg.kernel_stride)


def stage1_scores(q: torch.Tensor, kc: torch.Tensor, q_pos: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """S[j] = sum over the heads of a GQA group of softmax_j(q . Kc[j] / sqrt(D)) over visible kernels.
    q (B, H, T, D), kc (B, Hkv, NK, D) -> (B, Hkv, T, NK) fp32; invisible kernels score 0."""
    B, H, T, D = q.shape
    Hkv, NK = kc.shape[1], kc.shape[2]
    qg = q.float().view(B, Hkv, H // Hkv, T, D)
    logits = torch.einsum("bhgtd,bhjd->bhgtj", qg, kc.float()) / math.sqrt(D)  # (B, Hkv, G, T, NK)
    visible = torch.arange(NK, device=q.device)[None, None, :] < visible_kernels(q_pos, cfg)[:, :, None]
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no visible kernel: all 0
    return probs.sum(dim=2)


def block_scores(s: torch.Tensor, n_blocks: int, cfg: InfLLMv2Config) -> torch.Tensor:
    """Max-pool kernel scores to blocks: block b takes kernels b*r - 1 .. b*r + r - 1 (r = block/stride),
    the kernels overlapping it when kernel_size = 2 * stride. (B, Hkv, T, NK) -> (B, Hkv, T, n_blocks)."""
    r = cfg.block_size // cfg.kernel_stride
    need = n_blocks * r + 1  # one kernel of padding on the left, enough on the right
    padded = torch.zeros(*s.shape[:-1], need, dtype=s.dtype, device=s.device)  # scores are >= 0
    take = min(s.shape[-1], need - 1)
    padded[..., 1:1 + take] = s[..., :take]
    return padded.unfold(-1, r + 1, r).amax(dim=-1)  # (B, Hkv, T, n_blocks)


def select_blocks(scores: torch.Tensor, q_pos: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """Block mask (B, Hkv, T, NB): the init blocks, the local window ending at the query's own block, and
    the best topk - init_blocks blocks strictly before the window (ties go to the lower block index)."""
    NB = scores.shape[-1]
    b = torch.arange(NB, device=scores.device)
    own = torch.div(q_pos, cfg.block_size, rounding_mode="floor")[:, None, :, None]  # (B, 1, T, 1)
    init = (b < cfg.init_blocks) & (b <= own)
    window = (b <= own) & (b > own - cfg.window_blocks)
    candidate = (b <= own - cfg.window_blocks) & ~init
    ranked = scores.masked_fill(~candidate, float("-inf"))
    n_pick = cfg.topk - cfg.init_blocks
    if torch.onnx.is_in_onnx_export():
        # ONNX TopK returns equal values lower index first (the operator's specification): the same rule.
        best = torch.topk(ranked, k=min(n_pick, NB), dim=-1).indices
    else:
        best = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n_pick]
    chosen = torch.zeros_like(candidate.expand_as(scores))
    chosen.scatter_(-1, best, True)
    return init | window | (chosen & candidate)


def sparse_block_mask(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """Stages 1 and 2 of the selection, from the whole key cache: (B, Hkv, T, NB) bool."""
    n_blocks = -(-k.shape[2] // cfg.block_size)
    s = stage1_scores(q, compress_keys(k, cfg), q_pos, cfg)
    return select_blocks(block_scores(s, n_blocks, cfg), q_pos, cfg)


def dense_rows(q_pos: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """Rows whose kv length (last query position + 1) is below dense_len attend densely. (B,) bool."""
    return q_pos.amax(dim=1) + 1 < cfg.dense_len


def infllm_v2_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            cfg: InfLLMv2Config) -> torch.Tensor:
    """InfLLM v2: dense below dense_len, else block-sparse attention over the selected blocks (the
    selection of cfg.revision)."""
    dense = dense_rows(q_pos, cfg)
    if bool(dense.all()):
        return attention_ref(q, k, v, q_pos)
    mask = selected_blocks(q, k, q_pos, cfg) | dense[:, None, None, None]
    return attention_ref(q, k, v, q_pos, mask, cfg.block_size)


def selected_blocks(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """The block mask (B, Hkv, T, NB) of cfg.revision: sparse_block_mask (1) or sparse_block_mask_rev2 (2)."""
    return (sparse_block_mask if cfg.revision == 1 else sparse_block_mask_rev2)(q, k, q_pos, cfg)


# --- InfLLM v2, revision 2 (MiniCPM4.1, September 2025) ------------------------------------------------
# Same kernels, block pooling, dense_len and stage 2 as revision 1. What changes:
#  - stage 1 normalises with the log-sum-exp over coarse chunk means (lse_kernel_size keys every
#    lse_kernel_stride, visible once ended) instead of over the kernels themselves, so scores may exceed
#    1, and are all 0 while no coarse chunk is visible yet (the upstream reference's NaN -> 0);
#  - the init blocks and the window (the query's own block and window_blocks before it) enter one
#    top-k of topk + window_blocks blocks with +inf; the top-k runs over every block of the cache and
#    only then are blocks after the query's own block dropped.
def compress_coarse_keys(k: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """Revision 2's second compressed key set: (B, Hkv, S, D) -> (B, Hkv, NK2, D) fp32."""
    return chunk_means(k, cfg.lse_kernel_size, cfg.lse_kernel_stride)


def update_coarse_keys(kc2: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor,
                       cfg: InfLLMv2Config) -> torch.Tensor:
    """update_chunk_means for the coarse keys: decode's second piece of incremental state."""
    return update_chunk_means(kc2, k, q_pos, cfg.lse_kernel_size, cfg.lse_kernel_stride)


def stage1_scores_lse(q: torch.Tensor, kc: torch.Tensor, kc2: torch.Tensor, q_pos: torch.Tensor,
                      cfg: InfLLMv2Config) -> torch.Tensor:
    """S[j] = sum over the heads of a GQA group of exp(q . Kc[j] / sqrt(D) - LSE), LSE the log-sum-exp
    of q . Kc2[i] / sqrt(D) over the visible coarse keys. q (B, H, T, D), kc (B, Hkv, NK, D),
    kc2 (B, Hkv, NK2, D) -> (B, Hkv, T, NK) fp32; invisible kernels score 0, and every kernel while no
    coarse key is visible (the upstream online softmax's NaN, set to 0)."""
    B, H, T, D = q.shape
    Hkv, NK, NK2 = kc.shape[1], kc.shape[2], kc2.shape[2]
    qg = q.float().view(B, Hkv, H // Hkv, T, D)
    logits = torch.einsum("bhgtd,bhjd->bhgtj", qg, kc.float()) / math.sqrt(D)  # (B, Hkv, G, T, NK)
    coarse = torch.einsum("bhgtd,bhjd->bhgtj", qg, kc2.float()) / math.sqrt(D)  # (B, Hkv, G, T, NK2)
    seen2 = torch.arange(NK2, device=q.device) < visible_chunks(q_pos, cfg.lse_kernel_size,
                                                                cfg.lse_kernel_stride)[:, :, None]  # (B, T, NK2)
    lse = coarse.masked_fill(~seen2[:, None, None], float("-inf")).logsumexp(dim=-1, keepdim=True)
    seen = torch.arange(NK, device=q.device) < visible_kernels(q_pos, cfg)[:, :, None]  # (B, T, NK)
    probs = torch.exp(logits - lse).masked_fill(~seen[:, None, None] | torch.isinf(lse), 0.0)  # (B, Hkv, G, T, NK)
    return probs.sum(dim=2)


def select_blocks_rev2(scores: torch.Tensor, q_pos: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """Block mask (B, Hkv, T, NB): top-k of topk + window_blocks blocks over all NB blocks, where the init
    blocks and the window (own block and window_blocks before it) score +inf, then blocks after the
    query's own block dropped (they may have taken places). Ties go to the lower block index."""
    NB = scores.shape[-1]
    b = torch.arange(NB, device=scores.device)
    own = torch.div(q_pos, cfg.block_size, rounding_mode="floor")[:, None, :, None]  # (B, 1, T, 1)
    forced = (b < cfg.init_blocks) | ((b <= own) & (b >= own - cfg.window_blocks))
    ranked = scores.masked_fill(forced, float("inf"))
    n_pick = min(cfg.max_selected, NB)
    if torch.onnx.is_in_onnx_export():
        best = torch.topk(ranked, k=n_pick, dim=-1).indices  # ONNX TopK: equal values, lower index first
    else:
        best = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n_pick]
    chosen = torch.zeros(ranked.shape, dtype=torch.bool, device=scores.device)
    chosen.scatter_(-1, best, True)
    return chosen & (b <= own)


def sparse_block_mask_rev2(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor,
                           cfg: InfLLMv2Config) -> torch.Tensor:
    """Revision 2's selection from the whole key cache: (B, Hkv, T, NB) bool."""
    n_blocks = -(-k.shape[2] // cfg.block_size)
    s = stage1_scores_lse(q, compress_keys(k, cfg), compress_coarse_keys(k, cfg), q_pos, cfg)
    return select_blocks_rev2(block_scores(s, n_blocks, cfg), q_pos, cfg)
