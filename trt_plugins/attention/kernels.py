"""Triton kernels for attention: InfLLM v2 stage-1 scoring and block-sparse flash attention.

One program per (query token, batch row x kv head). The query heads of one GQA group are loaded together
as the M dimension of tl.dot (padded to 16, tl.dot's minimum), so one selection and one pass over the keys
serve the whole group — the point of InfLLM v2's shared selection. Dense attention is the same kernel
visiting every block up to the query's own (DENSE=True): the engine uses it for short contexts and for
models without sparse_config.

Key compression, block pooling and top-k (with the reference's tie rule, lower block index first) are
Triton kernels too, in selection.py, so the TensorRT plugin runs the whole of InfLLM v2 without torch.

Runs on CUDA, or on CPU tensors with TRITON_INTERPRET=1 (the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trt_plugins import plans
from trt_plugins.attention.reference import InfLLMv2Config
from trt_plugins.executors import DTYPE_NAMES, run_launch, run_triton
from trt_plugins.plans import Ptr


@triton.jit
def stage1_scores_kernel(
        Q, KC, POS, OUT,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_pb, stride_pt,
        stride_ob, stride_oh, stride_ot, stride_oj,
        n_kv_heads, n_kernels, n_tokens, kernel_size, kernel_stride, dense_len, scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr):
    """OUT[b, h, t, j] = sum over the group's heads of softmax_j(q . kc[j] * scale) for the visible kernels
    j < n_vis(pos); slots past n_vis are not written (the selection reads only visible ones). A row whose kv
    length (its last position + 1) is below dense_len attends densely: nothing to score, the program exits."""
    t = tl.program_id(0)
    b = tl.program_id(1) // n_kv_heads
    h = tl.program_id(1) % n_kv_heads
    pos = tl.load(POS + b * stride_pb + t * stride_pt)
    last = tl.load(POS + b * stride_pb + (n_tokens - 1) * stride_pt)
    if last + 1 >= dense_len:
        n_vis = tl.where(pos >= kernel_size - 1, (pos - kernel_size + 1) // kernel_stride + 1, 0)
        n_vis = tl.minimum(n_vis, n_kernels)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + t * stride_qt + d[None, :] * stride_qd,
                    mask=g[:, None] < GROUP, other=0.0).to(tl.float32)
        kc_base = KC + b * stride_kb + h * stride_kh + d[None, :] * stride_kd

        # Pass 1: softmax statistics per head over the visible kernels (online max and sum).
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        for j0 in range(0, n_vis, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            kc = tl.load(kc_base + j[:, None] * stride_kj, mask=j[:, None] < n_vis, other=0.0)
            s = tl.dot(q, tl.trans(kc), input_precision="ieee") * scale  # (GROUP_PAD, BLOCK_J)
            s = tl.where(j[None, :] < n_vis, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new

        # Pass 2: probabilities summed over the group's heads, for the visible kernels.
        out_base = OUT + b * stride_ob + h * stride_oh + t * stride_ot
        for j0 in range(0, n_vis, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            kc = tl.load(kc_base + j[:, None] * stride_kj, mask=j[:, None] < n_vis, other=0.0)
            s = tl.dot(q, tl.trans(kc), input_precision="ieee") * scale
            p = tl.exp(s - m[:, None]) / l[:, None]
            p = tl.where((g[:, None] < GROUP) & (j[None, :] < n_vis), p, 0.0)
            tl.store(out_base + j * stride_oj, tl.sum(p, axis=0), mask=j < n_vis)


@triton.jit
def stage1_scores_lse_kernel(
        Q, KC, KC2, POS, OUT,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_cb, stride_ch, stride_cj, stride_cd,
        stride_pb, stride_pt,
        stride_ob, stride_oh, stride_ot, stride_oj,
        n_kv_heads, n_kernels, n_coarse, n_tokens, kernel_size, kernel_stride, lse_kernel_size,
        lse_kernel_stride, dense_len, scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_J: tl.constexpr):
    """Revision 2's stage 1: OUT[b, h, t, j] = sum over the group's heads of exp(q . kc[j] * scale - LSE) for
    the visible kernels j < n_vis(pos), LSE the log-sum-exp of q . kc2[i] * scale over the visible coarse
    keys (0 for every kernel while none is visible). Slots past n_vis are not written; rows below dense_len
    exit at once, as in stage1_scores_kernel."""
    t = tl.program_id(0)
    b = tl.program_id(1) // n_kv_heads
    h = tl.program_id(1) % n_kv_heads
    pos = tl.load(POS + b * stride_pb + t * stride_pt)
    last = tl.load(POS + b * stride_pb + (n_tokens - 1) * stride_pt)
    if last + 1 >= dense_len:
        n_vis = tl.where(pos >= kernel_size - 1, (pos - kernel_size + 1) // kernel_stride + 1, 0)
        n_vis = tl.minimum(n_vis, n_kernels)
        n_vis2 = tl.where(pos >= lse_kernel_size - 1, (pos - lse_kernel_size + 1) // lse_kernel_stride + 1, 0)
        n_vis2 = tl.minimum(n_vis2, n_coarse)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + t * stride_qt + d[None, :] * stride_qd,
                    mask=g[:, None] < GROUP, other=0.0).to(tl.float32)

        # Pass 1: the log-sum-exp per head over the visible coarse keys (online max and sum).
        kc2_base = KC2 + b * stride_cb + h * stride_ch + d[None, :] * stride_cd
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l = tl.zeros([GROUP_PAD], tl.float32)
        for j0 in range(0, n_vis2, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            kc2 = tl.load(kc2_base + j[:, None] * stride_cj, mask=j[:, None] < n_vis2, other=0.0)
            s = tl.dot(q, tl.trans(kc2), input_precision="ieee") * scale  # (GROUP_PAD, BLOCK_J)
            s = tl.where(j[None, :] < n_vis2, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(tl.where(l > 0, l, 1.0))  # -inf while no coarse key is visible (l = 0, m = -inf)

        # Pass 2: exp(logit - LSE) summed over the group's heads, for the visible kernels.
        kc_base = KC + b * stride_kb + h * stride_kh + d[None, :] * stride_kd
        out_base = OUT + b * stride_ob + h * stride_oh + t * stride_ot
        for j0 in range(0, n_vis, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            kc = tl.load(kc_base + j[:, None] * stride_kj, mask=j[:, None] < n_vis, other=0.0)
            s = tl.dot(q, tl.trans(kc), input_precision="ieee") * scale
            p = tl.exp(s - lse[:, None])
            p = tl.where((g[:, None] < GROUP) & (j[None, :] < n_vis) & (n_vis2 > 0), p, 0.0)
            tl.store(out_base + j * stride_oj, tl.sum(p, axis=0), mask=j < n_vis)


@triton.jit
def block_attention_kernel(
        Q, K, V, O, POS, BLOCK_IDX, BLOCK_CNT,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_vb, stride_vh, stride_vs, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        stride_pb, stride_pt,
        stride_ib, stride_ih, stride_it, stride_ii,
        stride_cb, stride_ch, stride_ct,
        n_kv_heads, n_tokens, dense_len, scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
        DENSE: tl.constexpr, UPCAST: tl.constexpr):
    """Flash attention of one query token (all heads of its GQA group) over a list of key blocks.

    DENSE: visit blocks 0 .. pos // BLOCK_N; else the BLOCK_CNT[b, h, t] blocks listed in BLOCK_IDX, except
    for a row whose kv length (last position + 1) is below dense_len, which visits every block up to its own
    (InfLLM v2's dense short contexts; its selection kernels exited without writing). Keys past the query's
    position are masked inside each block (token-level causality).
    """
    t = tl.program_id(0)
    b = tl.program_id(1) // n_kv_heads
    h = tl.program_id(1) % n_kv_heads
    pos = tl.load(POS + b * stride_pb + t * stride_pt)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + b * stride_qb + (h * GROUP + g)[:, None] * stride_qh + t * stride_qt + d[None, :] * stride_qd,
                mask=g[:, None] < GROUP, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh + d[None, :] * stride_kd
    v_base = V + b * stride_vb + h * stride_vh + d[None, :] * stride_vd

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if DENSE:
        listed = pos < 0  # never: every block up to the query's own
    else:
        last = tl.load(POS + b * stride_pb + (n_tokens - 1) * stride_pt)
        listed = last + 1 >= dense_len
    listed_count = tl.load(BLOCK_CNT + b * stride_cb + h * stride_ch + t * stride_ct, mask=listed, other=0)
    count = tl.where(listed, listed_count.to(tl.int64), pos // BLOCK_N + 1)
    idx_base = BLOCK_IDX + b * stride_ib + h * stride_ih + t * stride_it
    for i in range(0, count):
        block = tl.where(listed, tl.load(idx_base + i * stride_ii, mask=listed, other=0).to(tl.int64), i)
        keys = block * BLOCK_N + n
        visible = keys <= pos
        k = tl.load(k_base + keys[:, None] * stride_ks, mask=visible[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # (GROUP_PAD, BLOCK_N) fp32
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vs, mask=visible[:, None], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    out = acc / l[:, None]
    tl.store(O + b * stride_ob + (h * GROUP + g)[:, None] * stride_oh + t * stride_ot + d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=g[:, None] < GROUP)


@triton.jit
def cache_write_kernel(
        NEW, CACHE, POS,
        stride_nb, stride_nt, stride_nh, stride_nd,
        stride_cb, stride_ch, stride_cs, stride_cd,
        stride_pb, stride_pt,
        n_kv_heads, HEAD_DIM: tl.constexpr):
    """CACHE[b, h, POS[b, t], :] = NEW[b, t, h, :]: one program per (token, row x kv head). In place, so a
    decode step writes one position per row instead of copying the cache."""
    t = tl.program_id(0)
    b = tl.program_id(1) // n_kv_heads
    h = tl.program_id(1) % n_kv_heads
    d = tl.arange(0, HEAD_DIM)
    pos = tl.load(POS + b * stride_pb + t * stride_pt)
    value = tl.load(NEW + b * stride_nb + t * stride_nt + h * stride_nh + d * stride_nd)
    tl.store(CACHE + b * stride_cb + h * stride_ch + pos * stride_cs + d * stride_cd,
             value.to(CACHE.dtype.element_ty))


def write_cache_(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """In-place Triton version of trt_plugins.ops.write_cache: cache (B, Hkv, S, D), new (B, T, Hkv, D)."""
    B, T, Hkv, D = new.shape
    pos = positions.to(torch.int64).contiguous()
    launch = plans.cache_write_launch(Ptr("new"), new.stride(), Ptr("cache"), cache.stride(), Ptr("pos"),
                                      pos.stride(), batch=B, tokens=T, kv_heads=Hkv, head_dim=D,
                                      dtype=DTYPE_NAMES[cache.dtype])
    run_launch(launch, {"new": new, "cache": cache, "pos": pos})
    return cache


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q (B, H, T, D) and k, v (B, Hkv, S, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[3] != k.shape[3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not form GQA groups")
    if q.shape[3] not in (64, 128):
        raise ValueError(f"head_dim {q.shape[3]} is not supported (64 or 128)")
    if q_pos.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"q_pos must be (B, T) = {(q.shape[0], q.shape[2])}, got {tuple(q_pos.shape)}")


def stage1_scores(q: torch.Tensor, kc: torch.Tensor, q_pos: torch.Tensor, cfg: InfLLMv2Config) -> torch.Tensor:
    """Triton version of reference.stage1_scores: (B, Hkv, T, NK) fp32, 0 where a kernel is not visible.
    Rows below cfg.dense_len are not scored (zeros): they attend densely."""
    B, H, T, D = q.shape
    Hkv, NK = kc.shape[1], kc.shape[2]
    out = torch.zeros(B, Hkv, T, NK, device=q.device, dtype=torch.float32)
    if NK == 0:
        return out
    pos = q_pos.to(torch.int64).contiguous()  # int64, as the ONNX graph carries them
    launch = plans.stage1_launch(Ptr("q"), q.stride(), Ptr("kc"), kc.stride(), Ptr("pos"), pos.stride(), Ptr("out"),
                                 out.stride(), batch=B, tokens=T, kv_heads=Hkv, group=H // Hkv, head_dim=D,
                                 kernels=NK, dtype=DTYPE_NAMES[q.dtype], cfg=cfg)
    run_launch(launch, {"q": q, "kc": kc, "pos": pos, "out": out})
    return out


def stage1_scores_lse(q: torch.Tensor, kc: torch.Tensor, kc2: torch.Tensor, q_pos: torch.Tensor,
                      cfg: InfLLMv2Config, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of reference.stage1_scores_lse (revision 2): (B, Hkv, T, NK) fp32 into `out` (zeros
    when not given), which keeps its values where a kernel is not visible and in rows below dense_len."""
    B, H, T, D = q.shape
    Hkv, NK, NK2 = kc.shape[1], kc.shape[2], kc2.shape[2]
    if out is None:
        out = torch.zeros(B, Hkv, T, NK, device=q.device, dtype=torch.float32)
    if NK == 0:
        return out
    pos = q_pos.to(torch.int64).contiguous()
    launch = plans.stage1_lse_launch(Ptr("q"), q.stride(), Ptr("kc"), kc.stride(), Ptr("kc2"), kc2.stride(), Ptr("pos"),
                                     pos.stride(), Ptr("out"), out.stride(), batch=B, tokens=T, kv_heads=Hkv,
                                     group=H // Hkv, head_dim=D, kernels=NK, coarse_kernels=NK2,
                                     dtype=DTYPE_NAMES[q.dtype], cfg=cfg)
    run_launch(launch, {"q": q, "kc": kc, "kc2": kc2, "pos": pos, "out": out})
    return out


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                    block_size: int, block_mask: torch.Tensor | None = None,
                    block_list: tuple[torch.Tensor, torch.Tensor] | None = None, dense_len: int = 0) -> torch.Tensor:
    """Attention over the selected blocks — a mask (B, Hkv, T, NB) or a list (indices ascending, counts) as
    selection.select_blocks makes it — or dense causal attention when neither is given. With a list, rows
    whose kv length is below dense_len attend densely (their list is not read)."""
    _check(q, k, v, q_pos)
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    pos = q_pos.to(torch.int64).contiguous()  # int64, as the ONNX graph carries them
    tensors = {"q": q, "k": k, "v": v, "out": out, "positions": pos}
    if block_mask is not None:
        NB = block_mask.shape[-1]
        cnt = block_mask.sum(-1, dtype=torch.int32)  # (B, Hkv, T)
        width = max(int(cnt.max()), 1)
        order = torch.where(block_mask, torch.arange(NB, device=q.device), NB)
        idx = torch.sort(order, dim=-1).values[..., :width].to(torch.int32).contiguous()  # ascending blocks
        block_list, dense_len = (idx, cnt), 0
    if block_list is not None:
        tensors["idx"], tensors["cnt"] = block_list
        lists = (Ptr("idx"), block_list[0].stride(), Ptr("cnt"), block_list[1].stride())
    else:
        lists = (None, None, None, None)
    launch = plans.block_attention_launch(
        Ptr("q"), q.stride(), Ptr("k"), k.stride(), Ptr("v"), v.stride(), Ptr("out"), out.stride(), Ptr("positions"),
        pos.stride(), *lists, batch=B, tokens=T, kv_heads=Hkv, group=H // Hkv, head_dim=D, block_size=block_size,
        dense_len=dense_len, dtype=DTYPE_NAMES[q.dtype])
    run_launch(launch, tensors)
    return out


def dense_attention(q, k, v, q_pos, block_size: int = plans.DENSE_BLOCK_N):
    """Dense causal GQA attention with the block kernel (every block up to the query's own)."""
    return block_attention(q, k, v, q_pos, block_size)


def infllm_v2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                        cfg: InfLLMv2Config) -> torch.Tensor:
    """reference.infllm_v2_attention_ref over a whole key cache, every step a Triton kernel: compression of
    every kernel the rows' positions have completed, then the plugin's per-chunk stage 1, selection and block
    attention (rows below dense_len attend densely); cfg.revision picks stage 1 and the selection rule."""
    from trt_plugins.attention import selection

    _check(q, k, v, q_pos)
    n_blocks = -(-k.shape[2] // cfg.block_size)
    kc = selection.compress_keys(k, cfg)
    if cfg.revision == 2:
        scores = stage1_scores_lse(q, kc, selection.compress_coarse_keys(k, cfg), q_pos, cfg)
    else:
        scores = stage1_scores(q, kc, q_pos, cfg)
    block_list = selection.select_blocks(scores, q_pos, cfg, n_blocks)
    return block_attention(q, k, v, q_pos, cfg.block_size, block_list=block_list, dense_len=cfg.dense_len)


def cpm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  positions: torch.Tensor, kc: torch.Tensor | None, sparse: InfLLMv2Config | None,
                  kc2: torch.Tensor | None = None) -> torch.Tensor:
    """The CpmAttention plugin's plan, executed with the Triton kernels: q (B, T, H*D), k, v (B, T, Hkv*D),
    caches (B, Hkv, S, D), kc (B, Hkv, NK, D) fp32 and, for revision 2, kc2 (B, Hkv, NK2, D) fp32 updated in
    place; returns out (B, T, H*D)."""
    B, T, HD = q.shape
    _, Hkv, S, D = k_cache.shape
    shape = plans.AttentionShape(B, T, HD // D, Hkv, S, D)
    if sparse is not None and sparse.revision == 2:
        if kc2 is None:
            raise ValueError("InfLLM v2 revision 2 carries its coarse compressed keys kc2: none given")
        shape = plans.AttentionShape(B, T, HD // D, Hkv, S, D, kc.shape[2], kc2.shape[2])
    plan = plans.attention_plan(shape, DTYPE_NAMES[q.dtype], sparse)
    out = torch.empty_like(q)
    tensors = {"q": q.contiguous(), "k": k.contiguous(), "v": v.contiguous(), "k_cache": k_cache,
               "v_cache": v_cache, "positions": positions.to(torch.int64).contiguous(), "out": out}
    if sparse is not None:
        tensors["kc"] = kc
        if sparse.revision == 2:
            tensors["kc2"] = kc2
    run_triton(plan, tensors)
    return out
