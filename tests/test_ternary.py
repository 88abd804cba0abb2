"""BitCPM4 ternary: layout detection, 2-bit packing, and the Triton GEMM against the torch reference."""
from __future__ import annotations

import random

import pytest
import torch

from export.tiny import fake_quantize_ternary
from trt_plugins.ternary import kernels
from trt_plugins.ternary.reference import (NotTernaryError, TernaryLayout, detect_layout, pack,
                                           ternary_linear_ref, unpack, weight_bytes)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 activations: the kernel sums 32-wide dot products per plane, torch one long dot: rounding only.
ATOL_FP32 = 1e-4
# fp16/bf16 outputs are rounded once at the end; compare at the output dtype's resolution.
RTOL_HALF = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("group, expected", [("tensor", TernaryLayout("tensor", 320)),
                                             ("row", TernaryLayout("row", 320)),
                                             (64, TernaryLayout("group", 64)),
                                             (32, TernaryLayout("group", 32))])
def test_detect_layout(group, expected, seed):
    w = fake_quantize_ternary(torch.randn(48, 320), group).to(torch.bfloat16)
    assert detect_layout(w) == expected


def test_not_ternary_is_refused_with_the_name():
    with pytest.raises(NotTernaryError, match="layers.0.mlp.up_proj.weight: not a ternary weight"):
        detect_layout(torch.randn(16, 64), "layers.0.mlp.up_proj.weight")


@pytest.mark.parametrize("group", ["tensor", "row", 32, 128])
def test_pack_unpack_roundtrip_and_bit_layout(group, seed):
    N, K = random.randint(3, 40), random.choice([128, 256, 384, 1024])
    if group == 128 and K % 128:
        K = 256
    w = fake_quantize_ternary(torch.randn(N, K), group)
    p = pack(w)
    assert p.packed.dtype == torch.uint8 and p.packed.shape == (N, -(-K // 128) * 32)
    torch.testing.assert_close(unpack(p), w, atol=0, rtol=0)
    # The documented layout, by hand: byte i of tile t holds weight t*128 + 32*s + i in bits 2s..2s+1.
    n, k = random.randrange(N), random.randrange(K)
    t, s, i = k // 128, (k % 128) // 32, k % 32
    code = (int(p.packed[n, t * 32 + i]) >> (2 * s)) & 3
    assert code == {0.0: 0, 1.0: 1, -1.0: 2}[float(torch.sign(w[n, k]))]


def test_ternary_weight_bytes_are_an_eighth_of_fp16():
    p = pack(fake_quantize_ternary(torch.randn(4096, 4096), "row"))
    assert weight_bytes(p) / (4096 * 4096 * 2) <= 1 / 7


@pytest.mark.parametrize("M, N, K, group", [(1, 96, 256, "row"), (3, 70, 384, 64), (8, 130, 512, "tensor"),
                                            (20, 64, 200, "row"), (5, 33, 1024, 128)])
def test_triton_matches_reference_fp32(M, N, K, group, seed, monkeypatch):
    w = fake_quantize_ternary(torch.randn(N, K), group)
    p = pack(w)
    p.packed, p.scales = p.packed.to(DEVICE), p.scales.to(DEVICE)
    x = torch.randn(M, K, device=DEVICE)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    got = kernels.ternary_linear(x, p)
    expected = x.double() @ w.double().T.to(DEVICE)  # independent of the packing
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), expected, atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(ternary_linear_ref(x, p).double(), expected, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_decode(dtype, seed):
    N, K = 128, 512
    w = fake_quantize_ternary(torch.randn(N, K), 128)
    p = pack(w)
    p.packed, p.scales = p.packed.to(DEVICE), p.scales.to(DEVICE)
    x = torch.randn(2, 1, K, device=DEVICE, dtype=dtype)
    got = kernels.ternary_linear(x, p)
    assert got.shape == (2, 1, N) and got.dtype == dtype
    expected = x.double() @ w.double().T.to(DEVICE)
    torch.testing.assert_close(got.double(), expected, rtol=RTOL_HALF[dtype], atol=RTOL_HALF[dtype] * 4)


def test_model_with_triton_ternary_equals_fake_quantized(tiny_models, seed):
    from export.checkpoint import load_model
    from export.transforms import pack_ternary

    path = tiny_models["ternary"]
    ids = torch.randint(3, 500, (2, 11))
    pos = torch.arange(11).expand(2, -1)
    with torch.inference_mode():
        plain = load_model(path)
        plain.setup_cache(2, 11)
        packed = pack_ternary(load_model(path), "triton")
        packed.setup_cache(2, 11)
        torch.testing.assert_close(packed(ids, pos), plain(ids, pos), atol=2e-4, rtol=0)
