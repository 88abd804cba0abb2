"""InfLLM v2 key compression and block selection in Triton against the torch reference (interpreter on CPU)."""
from __future__ import annotations

import random

import pytest
import torch

from trt_plugins.attention import selection
from trt_plugins.attention.reference import (InfLLMv2Config, block_scores, compress_keys, dense_rows,
                                             select_blocks)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=4, dense_len=128)


def test_compress_keys(seed):
    k = torch.randn(2, 2, random.randint(40, 200), 64, device=DEVICE)
    torch.testing.assert_close(selection.compress_keys(k, TINY), compress_keys(k, TINY), atol=1e-5, rtol=0)


def test_incremental_compression_equals_the_reference(seed):
    """A prefill then decode steps over several kernel strides, each call writing only the kernels its
    positions complete, rows at different lengths: the state equals compressing the whole cache."""
    B, Hkv, S, D = 2, 2, 256, 64
    k = torch.randn(B, Hkv, S, D, device=DEVICE)
    kc = torch.full((B, Hkv, (S - TINY.kernel_size) // TINY.kernel_stride + 1, D), float("nan"), device=DEVICE)
    lengths = [random.randint(20, 60), random.randint(61, 120)]
    for b, n in enumerate(lengths):  # prefill: one row per call, as the backends do
        selection.append_compressed_keys_(kc[b:b + 1], k[b:b + 1], torch.arange(n, device=DEVICE)[None], TINY)
    for step in range(4 * TINY.kernel_stride + 3):  # decode: more than three strides
        pos = torch.tensor([[n + step] for n in lengths], device=DEVICE)
        selection.append_compressed_keys_(kc, k, pos, TINY)
        for b in range(B):
            upto = int(pos[b, 0])
            expected = compress_keys(k[b:b + 1, :, :upto + 1], TINY)
            n_vis = expected.shape[2]
            torch.testing.assert_close(kc[b:b + 1, :, :n_vis], expected, atol=1e-5, rtol=0)
            assert torch.isnan(kc[b, :, n_vis:]).all(), "a kernel was written before its last key arrived"


@pytest.mark.parametrize("cfg", [TINY, InfLLMv2Config(kernel_size=32, kernel_stride=16, block_size=64,
                                                      window_size=128, topk=6, dense_len=300)])
def test_selection_matches_the_reference_with_ties(cfg, seed):
    B, Hkv, T = 2, 2, 5
    S = random.randint(8 * cfg.block_size, 12 * cfg.block_size)
    n_blocks = -(-S // cfg.block_size)
    nk = (S - cfg.kernel_size) // cfg.kernel_stride + 1
    levels = torch.tensor([0.0, 0.25, 0.5, 0.75])  # few distinct values: ties between blocks everywhere
    scores = levels[torch.randint(0, 4, (B, Hkv, T, nk))].to(DEVICE)
    pos = torch.sort(torch.randint(0, S, (B, T)), dim=1).values.to(DEVICE)
    pos[1] = torch.sort(torch.randint(0, cfg.dense_len - 1, (T,))).values  # row 1 still dense
    idx, cnt = selection.select_blocks(scores, pos, cfg, n_blocks)
    mask = select_blocks(block_scores(scores, n_blocks, cfg), pos, cfg)
    dense = dense_rows(pos, cfg)
    assert dense.tolist() == [False, True]
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                # a dense row is attended without a list: the kernel selects nothing for it
                expected = [] if dense[b] else torch.nonzero(mask[b, h, t]).flatten().tolist()
                assert idx[b, h, t, :cnt[b, h, t]].tolist() == expected, (b, h, t)
