"""InfLLM v2 revision 2 (MiniCPM4.1) in Triton against the torch reference (interpreter on CPU): the coarse
compressed keys (full and incremental), the log-sum-exp stage 1, the revision-2 selection, and the
CpmAttention plan for revision 2 run over a prefill past dense_len and decode steps across coarse strides.

Fresh random inputs, ragged lengths, outputs poisoned with NaN before the kernels write them.
"""
from __future__ import annotations

import random

import pytest
import torch

from trt_plugins import plans
from trt_plugins.attention import kernels, selection
from trt_plugins.attention.reference import (InfLLMv2Config, block_scores, compress_coarse_keys, compress_keys,
                                             dense_rows, infllm_v2_attention_ref, select_blocks_rev2,
                                             stage1_scores_lse, update_coarse_keys, visible_kernels)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: the kernels sum in another order than torch (online log-sum-exp, tl.dot tiles).
ATOL = 2e-5
RTOL = 1e-5  # revision 2's scores are not bounded by 1 (the normaliser comes from other keys)
# lse_kernel_size/stride = 64/32: coarse keys appear every 32 positions, the fine ones every 8.
TINY = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=4, dense_len=1,
                      revision=2)


def assert_close(got, expected, atol=ATOL, rtol=RTOL):
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=rtol)
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), expected.float().flatten(), dim=0)
    assert cos > 0.9999


def test_coarse_compression_full_and_incremental(seed):
    """The coarse keys of a whole cache, and a prefill then decode steps over more than two coarse strides
    with rows at different lengths: each call writes only the coarse keys its positions complete."""
    B, Hkv, S, D = 2, 2, random.randint(150, 200), 64
    k = torch.randn(B, Hkv, S, D, device=DEVICE)
    assert_close(selection.compress_coarse_keys(k, TINY), compress_coarse_keys(k, TINY))
    kc2 = torch.full((B, Hkv, plans.n_coarse_kernels(TINY, S), D), float("nan"), device=DEVICE)
    lengths = [random.randint(20, 50), random.randint(51, 80)]
    for b, n in enumerate(lengths):  # prefill: one row per call
        selection.append_compressed_keys_(kc2[b:b + 1], k[b:b + 1], torch.arange(n, device=DEVICE)[None], TINY,
                                          coarse=True)
    step = 0
    while step < 2 * TINY.lse_kernel_stride + 5:  # decode: one or a few consecutive positions per row
        width = random.choice([1, 1, 3])
        pos = torch.tensor([[n + step + i for i in range(width)] for n in lengths], device=DEVICE)
        expected = update_coarse_keys(kc2.nan_to_num(0.0), k, pos, TINY)
        selection.append_compressed_keys_(kc2, k, pos, TINY, coarse=True)
        for b in range(B):
            n_vis = compress_coarse_keys(k[b:b + 1, :, :int(pos[b, -1]) + 1], TINY).shape[2]
            torch.testing.assert_close(kc2[b, :, :n_vis], expected[b, :, :n_vis], atol=ATOL, rtol=0)
            assert torch.isnan(kc2[b, :, n_vis:]).all(), "a coarse key was written before its last key arrived"
        step += width


@pytest.mark.parametrize("group, head_dim", [(1, 64), (3, 128), (16, 64)])
def test_stage1_scores_lse(group, head_dim, seed):
    """Positions from before the first fine kernel to past several coarse keys, so rows with no coarse key
    visible yet (all 0) are among them; slots the kernel must not write stay NaN."""
    B, Hkv, S, T = 2, 2, random.randint(90, 140), 6
    q = torch.randn(B, Hkv * group, T, head_dim, device=DEVICE)
    k = torch.randn(B, Hkv, S, head_dim, device=DEVICE)
    pos = torch.stack([torch.randint(0, S, (T,)) for _ in range(B)])
    pos[0, :3] = torch.tensor([random.randint(0, 14), random.randint(15, 62), random.randint(63, S - 1)])
    pos = pos.to(DEVICE)
    kc, kc2 = compress_keys(k, TINY), compress_coarse_keys(k, TINY)
    out = torch.full((B, Hkv, T, kc.shape[2]), float("nan"), device=DEVICE)
    got = kernels.stage1_scores_lse(q, kc, kc2, pos, TINY, out=out)
    expected = stage1_scores_lse(q, kc, kc2, pos, TINY)
    n_vis = (torch.div(pos - TINY.kernel_size + 1, TINY.kernel_stride, rounding_mode="floor") + 1).clamp(0, kc.shape[2])
    visible = torch.arange(kc.shape[2], device=DEVICE) < n_vis[:, None, :, None]  # (B, 1, T, NK)
    visible = visible.expand_as(got)
    assert_close(got[visible], expected[visible])
    assert torch.isnan(got[~visible]).all()
    assert (expected[0, :, 1] == 0).all() and visible[0, :, 1].any()  # a row with fine but no coarse keys: 0


@pytest.mark.parametrize("cfg", [TINY, InfLLMv2Config(kernel_size=32, kernel_stride=16, block_size=64,
                                                      window_size=128, topk=5, init_blocks=2, dense_len=300,
                                                      revision=2)])
def test_selection_rev2_matches_the_reference_with_ties(cfg, seed):
    """Few distinct score levels (ties everywhere), positions from the first blocks (fewer blocks than places)
    to the end of the cache, one row below dense_len (nothing listed)."""
    B, Hkv, T = 2, 2, 6
    S = random.randint(8 * cfg.block_size, 12 * cfg.block_size) + random.randint(1, cfg.block_size - 1)
    n_blocks = -(-S // cfg.block_size)
    nk = (S - cfg.kernel_size) // cfg.kernel_stride + 1
    levels = torch.tensor([0.0, 0.5, 1.5, 3.0])  # revision 2's scores may exceed 1
    scores = levels[torch.randint(0, 4, (B, Hkv, T, nk))].to(DEVICE)
    pos = torch.randint(0, S, (B, T))
    pos[0, 0] = random.randint(0, 2 * cfg.block_size)
    pos = torch.sort(pos, dim=1).values.to(DEVICE)
    if cfg.dense_len > 1:
        pos[1] = torch.sort(torch.randint(0, cfg.dense_len - 1, (T,))).values  # row 1 still dense
    # Stage 1 scores kernels not yet visible 0 (the reference) or leaves them unwritten (the kernel, which
    # then reads only visible ones): future blocks score 0 and still take places before being dropped.
    visible = torch.arange(nk, device=DEVICE) < visible_kernels(pos, cfg)[:, None, :, None]  # (B, 1, T, NK)
    idx, cnt = selection.select_blocks(scores.masked_fill(~visible, float("nan")), pos, cfg, n_blocks)
    mask = select_blocks_rev2(block_scores(scores.masked_fill(~visible, 0.0), n_blocks, cfg), pos, cfg)
    dense = dense_rows(pos, cfg)
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                expected = [] if dense[b] else torch.nonzero(mask[b, h, t]).flatten().tolist()
                assert idx[b, h, t, :cnt[b, h, t]].tolist() == expected, (b, h, t)


def test_infllm_v2_rev2_end_to_end(seed):
    """Compression, stage 1 and selection of revision 2 by Triton, then the sparse kernel; one row dense."""
    cfg = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=3, dense_len=150,
                         revision=2)
    B, Hkv, group, S, D = 2, 2, 4, random.randint(220, 300), 64
    q = torch.randn(B, Hkv * group, 3, D, device=DEVICE)
    k, v = torch.randn(2, B, Hkv, S, D, device=DEVICE)
    pos = torch.stack([torch.randint(160, S, (3,)), torch.randint(0, 140, (3,))])
    pos = torch.sort(pos, dim=1).values.to(DEVICE)
    assert_close(kernels.infllm_v2_attention(q, k, v, pos, cfg), infllm_v2_attention_ref(q, k, v, pos, cfg))


def test_attention_plan_rev2_prefill_then_decode(seed):
    """The CpmAttention plan of revision 2 executed by the interpreter executor, rows at different lengths:
    row 0's prefill comes in two calls, the second past dense_len; row 1 crosses dense_len while decoding;
    decode calls of one to three tokens go across more than two coarse strides. The output equals
    reference.infllm_v2_attention_ref over the written cache, and the carried kc, kc2 equal the reference
    compression where visible (they start NaN: nothing may be read before it is written). Coarse keys every
    8 positions and 16-token blocks keep the interpreter's work small."""
    from trt_plugins.ops import write_cache

    cfg = InfLLMv2Config(kernel_size=4, kernel_stride=2, block_size=16, window_size=16, topk=3, dense_len=40,
                         revision=2)
    B, Hkv, group, S, D = 2, 1, 3, 96, 64  # one kv head: the interpreter's time goes by (token, row x kv head)
    H = Hkv * group
    k_cache, v_cache = torch.randn(2, B, Hkv, S, D, device=DEVICE)  # unwritten positions: never visible
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    kc = torch.full((B, Hkv, plans.n_kernels(cfg, S), D), float("nan"), device=DEVICE)
    kc2 = torch.full((B, Hkv, plans.n_coarse_kernels(cfg, S), D), float("nan"), device=DEVICE)
    sparse_calls = 0

    def call(rows, start: list[int], width: int):  # rows: a slice of the batch, so the state views stay contiguous
        nonlocal sparse_calls
        positions = torch.tensor([[p + i for i in range(width)] for p in start], device=DEVICE)
        n = len(start)
        q = torch.randn(n, width, H, D, device=DEVICE)
        k, v = torch.randn(2, n, width, Hkv, D, device=DEVICE)
        out = kernels.cpm_attention(q.view(n, width, H * D), k.view(n, width, -1), v.view(n, width, -1),
                                    k_cache[rows], v_cache[rows], positions, kc[rows], cfg, kc2[rows])
        ref_k[rows] = write_cache(ref_k[rows], k, positions)
        ref_v[rows] = write_cache(ref_v[rows], v, positions)
        expected = infllm_v2_attention_ref(q.transpose(1, 2), ref_k[rows], ref_v[rows], positions, cfg)
        assert_close(out.view(n, width, H, D), expected.transpose(1, 2))
        sparse_calls += int((~dense_rows(positions, cfg)).sum())

    first = random.randint(20, 35)
    call(slice(0, 1), [0], first)  # below dense_len: attends densely
    lengths = [random.randint(60, 66), random.randint(25, 32)]
    call(slice(0, 1), [first], lengths[0] - first)  # the rest of row 0's prompt, past dense_len
    call(slice(1, 2), [0], lengths[1])
    end = lengths[0] + 2 * cfg.lse_kernel_stride + 3
    while lengths[0] < end:
        width = random.choice([1, 2, 3])
        call(slice(0, B), lengths, width)
        lengths = [n + width for n in lengths]
    assert lengths[1] > cfg.dense_len and sparse_calls > 8
    for b, n in enumerate(lengths):
        for state, full in ((kc, compress_keys(ref_k[b:b + 1, :, :n], cfg)),
                            (kc2, compress_coarse_keys(ref_k[b:b + 1, :, :n], cfg))):
            torch.testing.assert_close(state[b:b + 1, :, :full.shape[2]], full, atol=ATOL, rtol=0)
            assert torch.isnan(state[b, :, full.shape[2]:]).all()
