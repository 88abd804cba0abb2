"""The InfLLM v2 torch reference against brute-force loops written from the prose of its README."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from trt_plugins.attention.reference import (InfLLMv2Config, append_compressed_keys, attention_ref,
                                             block_scores, compress_keys, infllm_v2_attention_ref,
                                             select_blocks, stage1_scores, visible_kernels)

TINY = InfLLMv2Config(kernel_size=16, kernel_stride=8, init_blocks=1, block_size=32, window_size=64, topk=4,
                      dense_len=128)


def test_visible_kernels_by_hand():
    t = torch.arange(0, 100)
    got = visible_kernels(t, TINY).tolist()
    for pos, n in zip(range(100), got):
        assert n == sum(1 for j in range(100) if 8 * j + 15 <= pos)


def test_compress_keys_and_incremental_append(seed):
    k = torch.randn(2, 2, random.randint(40, 90), 64)
    kc = compress_keys(k, TINY)
    for j in range(kc.shape[2]):
        np.testing.assert_allclose(kc[:, :, j].numpy(), k[:, :, 8 * j:8 * j + 16].double().mean(2).numpy(),
                                   atol=1e-6)
    inc = torch.full((2, 2, k.shape[2] // 8, 64), float("nan"))  # poisoned: every kernel must be written
    length = 0
    while length < k.shape[2]:
        new = min(k.shape[2], length + random.choice([1, 1, 1, 5, 17]))
        append_compressed_keys(inc, k, length, new, TINY)
        length = new
    torch.testing.assert_close(inc[:, :, :kc.shape[2]], kc)


def test_stage1_scores_by_hand(seed):
    B, Hkv, G, D, S = 1, 2, 3, 64, 70
    q, k = torch.randn(B, Hkv * G, 1, D), torch.randn(B, Hkv, S, D)
    t = random.randint(0, S - 1)
    kc = compress_keys(k, TINY)
    got = stage1_scores(q, kc, torch.tensor([[t]]), TINY)[0, :, 0]  # (Hkv, NK)
    for h in range(Hkv):
        visible = [j for j in range(kc.shape[2]) if 8 * j + 15 <= t]
        expected = np.zeros(kc.shape[2])
        for g in range(G):
            logits = [float(q[0, h * G + g, 0] @ kc[0, h, j]) / math.sqrt(D) for j in visible]
            if logits:
                p = np.exp(np.array(logits) - max(logits))
                expected[visible] += p / p.sum()
        np.testing.assert_allclose(got[h].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, InfLLMv2Config()])
def test_block_scores_take_the_kernels_overlapping_each_block(cfg, seed):
    nk, nb = random.randint(5, 60), random.randint(3, 20)
    s = torch.rand(1, 1, 1, nk)
    got = block_scores(s, nb, cfg)[0, 0, 0]
    for b in range(nb):
        overlapping = [float(s[0, 0, 0, j]) for j in range(nk)
                       if j * cfg.kernel_stride < (b + 1) * cfg.block_size
                       and j * cfg.kernel_stride + cfg.kernel_size > b * cfg.block_size]
        assert float(got[b]) == pytest.approx(max(overlapping, default=0.0))


def brute_force_selection(scores: list[float], t: int, cfg: InfLLMv2Config) -> set[int]:
    own = t // cfg.block_size
    picked = set(range(min(cfg.init_blocks, own + 1)))
    picked |= {b for b in range(own - cfg.window_blocks + 1, own + 1) if b >= 0}
    candidates = [b for b in range(len(scores)) if cfg.init_blocks <= b <= own - cfg.window_blocks]
    candidates.sort(key=lambda b: (-scores[b], b))  # best first, ties to the lower index
    return picked | set(candidates[:cfg.topk - cfg.init_blocks])


def test_select_blocks_with_ties(seed):
    nb = 14
    t_all = [random.randint(0, nb * 32 - 1) for _ in range(12)]
    levels = torch.tensor([0.1, 0.5, 0.9])
    scores = levels[torch.randint(0, 3, (1, 1, len(t_all), nb))]  # few distinct values: ties everywhere
    mask = select_blocks(scores, torch.tensor([t_all]), TINY)[0, 0]
    for i, t in enumerate(t_all):
        expected = brute_force_selection(scores[0, 0, i].tolist(), t, TINY)
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == expected, t


@pytest.mark.parametrize("group, head_dim", [(1, 64), (2, 64), (3, 128), (16, 64)])
def test_sparse_covering_every_block_equals_dense(group, head_dim, seed):
    cfg = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=64, dense_len=1)
    B, Hkv, S = 2, 2, 150
    q = torch.randn(B, Hkv * group, S, head_dim)
    k, v = torch.randn(B, Hkv, S, head_dim), torch.randn(B, Hkv, S, head_dim)
    pos = torch.arange(S).expand(B, -1)
    torch.testing.assert_close(infllm_v2_attention_ref(q, k, v, pos, cfg), attention_ref(q, k, v, pos))


def test_sparse_drops_blocks_and_prefill_matches_decode(tiny_models, seed):
    """A prompt longer than dense_len: prefill of the first P tokens, then decode one token at a time,
    gives the logits of one full prefill at every position from P on; and they differ from dense."""
    from export.checkpoint import load_model
    from export.transforms import use_sparse_attention

    model = load_model(tiny_models["sparse"])
    cfg = model.config.sparse
    use_sparse_attention(model)
    T = random.randint(300, 360)
    P = random.randint(cfg.dense_len, 200)
    ids = torch.randint(3, 500, (1, T))
    with torch.inference_mode():
        model.setup_cache(1, T)
        full = model(ids, torch.arange(T)[None])
        model.setup_cache(1, T)
        steps = [model(ids[:, :P], torch.arange(P)[None])]
        steps += [model(ids[:, t:t + 1], torch.tensor([[t]])) for t in range(P, T)]
        stepped = torch.cat(steps, 1)
        torch.testing.assert_close(stepped[:, P:], full[:, P:], atol=2e-4, rtol=0)
        dense = load_model(tiny_models["sparse"])
        dense.setup_cache(1, T)
        assert (dense(ids, torch.arange(T)[None])[:, P:] - full[:, P:]).abs().max() > 1e-3
