"""Triton attention kernels against the torch reference (interpreter on CPU, CUDA on a GPU).

Fresh random inputs each run, lengths that are not multiples of the block sizes, outputs poisoned with NaN
before each launch (so an unwritten element fails), allclose and cosine similarity.
"""
from __future__ import annotations

import random

import pytest
import torch

from trt_plugins.attention import kernels
from trt_plugins.attention.reference import (InfLLMv2Config, attention_ref, compress_keys,
                                             infllm_v2_attention_ref, sparse_block_mask, stage1_scores)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 everywhere: the kernel sums in a different order than torch (online softmax, block by block).
ATOL_FP32 = 2e-5
# fp16/bf16 inputs: the kernel rounds p to the value dtype before p @ v, as flash attention does.
ATOL_HALF = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TINY = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=4, dense_len=1)


def poison(monkeypatch):
    """Make torch.empty/empty_like hand the kernels NaN-filled memory."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan") if t.is_floating_point() else -(2**30))

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(real_like(*a, **kw)))


def assert_close(got, expected, atol):
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=0)
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), expected.float().flatten(), dim=0)
    assert cos > 0.9999


def qkv(B, group, Hkv, T, S, D, dtype=torch.float32):
    q = torch.randn(B, Hkv * group, T, D, device=DEVICE, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, device=DEVICE, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("group, head_dim", [(1, 64), (2, 64), (3, 128), (8, 64), (16, 128)])
def test_stage1_scores(group, head_dim, seed, monkeypatch):
    B, Hkv, S, T = 2, 2, random.randint(70, 130), 5
    q, k, _ = qkv(B, group, Hkv, T, S, head_dim)
    pos = torch.stack([torch.randint(0, S, (T,)) for _ in range(B)]).to(DEVICE)
    kc = compress_keys(k, TINY)
    poison(monkeypatch)
    got = kernels.stage1_scores(q, kc, pos, TINY)
    assert_close(got, stage1_scores(q, kc, pos, TINY), ATOL_FP32)


@pytest.mark.parametrize("group, head_dim", [(1, 64), (2, 128), (3, 64), (16, 64)])
def test_dense_attention_prefill(group, head_dim, seed, monkeypatch):
    B, Hkv, S = 2, 2, random.randint(33, 100)
    q, k, v = qkv(B, group, Hkv, S, S, head_dim)
    pos = torch.arange(S, device=DEVICE).expand(B, -1)
    poison(monkeypatch)
    assert_close(kernels.dense_attention(q, k, v, pos, block_size=32), attention_ref(q, k, v, pos), ATOL_FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_attention_decode_half(dtype, seed, monkeypatch):
    """Decode: one query per row, rows at different lengths of one cache."""
    B, Hkv, group, S, D = 3, 2, 8, random.randint(65, 140), 128
    q, k, v = qkv(B, group, Hkv, 1, S, D, dtype)
    pos = torch.randint(0, S, (B, 1), device=DEVICE)
    poison(monkeypatch)
    got = kernels.dense_attention(q, k, v, pos, block_size=64)
    assert_close(got, attention_ref(q.float(), k.float(), v.float(), pos), ATOL_HALF[dtype])


@pytest.mark.parametrize("group", [2, 16])
def test_block_sparse_attention_given_a_mask(group, seed, monkeypatch):
    B, Hkv, S, D = 2, 2, random.randint(200, 300), 64
    T = 7
    q, k, v = qkv(B, group, Hkv, T, S, D)
    pos = torch.randint(TINY.block_size * 3, S, (B, T), device=DEVICE)
    mask = sparse_block_mask(q, k, pos, TINY)
    assert (~mask).any()  # something is dropped
    poison(monkeypatch)
    got = kernels.block_attention(q, k, v, pos, TINY.block_size, mask)
    assert_close(got, attention_ref(q, k, v, pos, mask, TINY.block_size), ATOL_FP32)


def test_infllm_v2_end_to_end(seed, monkeypatch):
    """Selection by the Triton stage-1 kernel, then the sparse kernel; one row dense (below dense_len)."""
    cfg = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=4, dense_len=150)
    B, Hkv, group, S, D = 2, 2, 4, random.randint(220, 300), 64
    q, k, v = qkv(B, group, Hkv, 3, S, D)
    pos = torch.stack([torch.randint(160, S, (3,)), torch.randint(0, 140, (3,))])
    pos = torch.sort(pos, dim=1).values.to(DEVICE)  # a call's positions ascend within a row
    poison(monkeypatch)
    got = kernels.infllm_v2_attention(q, k, v, pos, cfg)
    assert_close(got, infllm_v2_attention_ref(q, k, v, pos, cfg), ATOL_FP32)


def test_sparse_with_every_block_selected_equals_dense(seed):
    cfg = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=64, dense_len=1)
    B, Hkv, group, S, D = 1, 2, 2, random.randint(100, 200), 64
    q, k, v = qkv(B, group, Hkv, 4, S, D)
    pos = torch.randint(0, S, (B, 4), device=DEVICE)
    assert_close(kernels.infllm_v2_attention(q, k, v, pos, cfg), attention_ref(q, k, v, pos), ATOL_FP32)


def test_model_with_triton_kernels_equals_reference(tiny_models, seed):
    """The tiny sparse model end to end: InfLLM v2 by Triton vs by the reference, past dense_len."""
    from export.checkpoint import load_model
    from export.transforms import use_sparse_attention

    path = tiny_models["sparse"]
    T = random.randint(140, 180)
    ids = torch.randint(3, 500, (1, T))
    logits = {}
    for impl in ("reference", "triton"):
        model = use_sparse_attention(load_model(path), impl)
        model.setup_cache(1, T)
        with torch.inference_mode():
            logits[impl] = model(ids, torch.arange(T)[None])
    assert_close(logits["triton"], logits["reference"], 2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cache_write_in_place(dtype, seed):
    from trt_plugins.ops import write_cache

    B, T, Hkv, D, S = 3, random.randint(1, 5), 2, 64, 40
    cache = torch.randn(B, Hkv, S, D, device=DEVICE).to(dtype)
    new = torch.randn(B, T, Hkv, D, device=DEVICE).to(dtype)
    pos = torch.stack([torch.randperm(S)[:T] for _ in range(B)]).to(DEVICE)
    expected = write_cache(cache, new, pos)
    same_memory = cache.data_ptr()
    kernels.write_cache_(cache, new, pos)
    assert cache.data_ptr() == same_memory and torch.equal(cache, expected)
