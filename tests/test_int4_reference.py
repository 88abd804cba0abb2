"""The INT4 definition: nibble packing, dequantize against a hand loop, Q4_0-identical round-to-nearest."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trt_plugins.int4.reference import (PackedInt4, codes_of, int4_dequantize, int4_linear_ref, pack_nibbles,
                                        quantize_rtn, unpack_nibbles, weight_bytes, zero_points_of)


def _random_packed(N, K, g, symmetric, perm=False, dtype=torch.float32):
    """A PackedInt4 of uniformly random codes (all 16 present), zero points and scales."""
    G = K // g
    codes = torch.randint(0, 16, (N, K))
    codes.view(-1)[:16] = torch.arange(16)
    zeros = None if symmetric else pack_nibbles(torch.randint(0, 16, (N, G)))
    scales = (torch.rand(N, G) * 0.1 + 0.01).to(dtype)
    return PackedInt4(pack_nibbles(codes), scales, zeros, K, g, torch.randperm(K) if perm else None), codes


@pytest.mark.parametrize("N, M", [(1, 1), (7, 33), (13, 64), (70, 129)])
def test_nibble_round_trip_every_code_ragged(N, M, seed):
    codes = torch.randint(0, 16, (N, M), dtype=torch.uint8)
    codes.view(-1)[: min(16, N * M)] = torch.arange(min(16, N * M), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (N, -(-M // 2))
    torch.testing.assert_close(unpack_nibbles(packed, M), codes, atol=0, rtol=0)
    n, j = random.randrange(N), random.randrange(M)
    byte = int(packed[n, j // 2])
    assert (byte >> (4 * (j % 2))) & 0xF == int(codes[n, j])  # even index low nibble, odd high


def test_nibble_codes_out_of_range_are_refused():
    with pytest.raises(ValueError, match="0..15"):
        pack_nibbles(torch.tensor([[3, 16]]))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("N, K, g", [(5, 64, 32), (3, 192, 64), (9, 256, 128)])
def test_dequantize_matches_a_hand_loop_over_bytes(N, K, g, symmetric, seed):
    p, _ = _random_packed(N, K, g, symmetric)
    G = K // g
    qw, zw, sc = p.qweight.tolist(), (p.zeros.tolist() if p.zeros is not None else None), p.scales.tolist()
    expected = torch.empty(N, K, dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            code = (qw[n][k // 2] >> (4 * (k % 2))) & 15
            grp = k // g
            zero = 8 if zw is None else (zw[n][grp // 2] >> (4 * (grp % 2))) & 15
            expected[n, k] = (code - zero) * sc[n][grp]
    assert G == p.groups
    torch.testing.assert_close(int4_dequantize(p), expected.float(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_applies_the_permutation_and_keeps_the_dtype(dtype, seed):
    N, K, g = random.randint(3, 40), 256, 64
    p, _ = _random_packed(N, K, g, symmetric=False, perm=True, dtype=dtype)
    x = torch.randn(2, 3, K).to(dtype)
    y = int4_linear_ref(x, p)
    assert y.dtype == dtype and y.shape == (2, 3, N)
    expected = (x.double()[..., p.perm] @ int4_dequantize(p).double().T)
    torch.testing.assert_close(y.double(), expected, atol=2e-2 if dtype != torch.float32 else 1e-4,
                               rtol=1e-2 if dtype != torch.float32 else 1e-5)


def _q4_0_block_numpy(x: np.ndarray):
    """llama.cpp quantize_row_q4_0_ref for one block, element by element in float32 as the C code does."""
    amax, vmax = np.float32(0), np.float32(0)
    for v in x:
        if amax < abs(v):
            amax, vmax = abs(v), v
    d = np.float32(vmax / np.float32(-8))
    inv = np.float32(1) / d if d else np.float32(0)
    codes = [min(15, int(np.float32(np.float32(v * inv) + np.float32(8.5)))) for v in x]
    return np.float16(d), codes


def test_symmetric_rtn_holds_the_numbers_of_llama_cpp_q4_0(seed):
    N, K = 6, 128
    w = torch.randn(N, K) * torch.rand(N, 1) * 0.2
    w[0, :32] = 0.0  # an all-zero block: d = 0, every code 8
    w[1, 5] = -w[1, :32].abs().max() * 1.5  # negative extreme: d > 0
    p = quantize_rtn(w, 32)
    assert p.zeros is None and p.scales.dtype == torch.float16
    codes = codes_of(p)
    for n in range(N):
        for b in range(K // 32):
            d, expected = _q4_0_block_numpy(w[n, 32 * b: 32 * b + 32].numpy())
            assert p.scales[n, b].item() == float(d)
            assert codes[n, 32 * b: 32 * b + 32].tolist() == expected


@pytest.mark.parametrize("g", [32, 64, 128])
def test_symmetric_rtn_error_bound(g, seed):
    N, K = random.randint(2, 50), 512
    w = torch.randn(N, K)
    p = quantize_rtn(w, g, scale_dtype=torch.float32)
    err = (int4_dequantize(p) - w).abs().reshape(N, K // g, g)
    step = (w.reshape(N, K // g, g).abs().amax(-1, keepdim=True) / 8)
    clamped = codes_of(p).reshape(N, K // g, g) == 15  # +8 steps does not exist: at most one step off
    slack = 1e-6
    assert bool((err[~clamped] <= (step / 2).expand_as(err)[~clamped] + slack).all())
    assert bool((err <= step + slack).all())


@pytest.mark.parametrize("g", [32, 128])
def test_asymmetric_rtn_error_bound_and_zero_points(g, seed):
    N, K = random.randint(2, 50), 256
    w = torch.randn(N, K) + 0.5
    p = quantize_rtn(w, g, symmetric=False, scale_dtype=torch.float32)
    assert p.zeros is not None and p.zeros.shape == (N, -(-(K // g) // 2))
    groups = w.reshape(N, K // g, g)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    err = (int4_dequantize(p) - w).abs().reshape(N, K // g, g)
    assert bool((err <= step.unsqueeze(-1) / 2 + 1e-5).all())
    expected_zero = torch.round(-groups.amin(-1) / p.scales).clamp(0, 15)
    torch.testing.assert_close(zero_points_of(p).float(), expected_zero, atol=0, rtol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="group_size 48"):
        quantize_rtn(torch.randn(4, 64), 48)
    with pytest.raises(ValueError, match="scales must be"):
        PackedInt4(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 3), None, 64, 32)


def test_int4_weight_bytes_are_about_a_quarter_of_fp16():
    p = quantize_rtn(torch.randn(256, 1024), 128)
    assert weight_bytes(p) / (256 * 1024 * 2) < 0.27
