"""The kit's custom ops, each one triple kept together: eager body (the torch reference), output shapes, and
the ONNX node the export writes (which TensorRT's ONNX parser maps to our plugin of the same name).

TensorRT's parser finds a plugin by the node's op_type, its `plugin_version` attribute and its
`plugin_namespace` attribute (or, from TensorRT 10.10, the node's domain). All three come from here.
"""
from __future__ import annotations

import torch

from trt_plugins.attention.reference import (InfLLMv2Config, attention_ref, infllm_v2_attention_ref,
                                             update_compressed_keys)
from trt_plugins.names import (ATTENTION_OP, NAMESPACE, ONNX_DOMAIN_VERSION, PLUGIN_VERSION, TERNARY_OP,  # noqa: F401
                               attention_attrs, config_from_attrs, plugin_attrs)
from trt_plugins.names import INT4_OP  # noqa: F401
from trt_plugins.ternary.reference import PackedTernary, ternary_linear_ref

def write_cache(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The cache (B, Hkv, S, D) with new (B, T, Hkv, D) written at positions (B, T): a new tensor."""
    rows = torch.arange(new.shape[0], device=new.device)[:, None]
    out = cache.clone()
    out[rows, :, positions] = new.to(cache.dtype)
    return out


def cpm_attention_eager(q, k, v, k_cache, v_cache, positions, sparse: InfLLMv2Config | None, kc=None):
    """CpmAttention's definition. q (B, T, H, D) and k, v (B, T, Hkv, D) post-RoPE; caches (B, Hkv, S, D);
    positions (B, T), consecutive per row. Returns out (B, T, H, D) and the caches with k, v written at
    positions; with InfLLM v2 state kc (B, Hkv, NK, D) fp32 given, also kc with the kernels this call
    completes. The attention itself is the reference's, from the whole cache."""
    k_all, v_all = write_cache(k_cache, k, positions), write_cache(v_cache, v, positions)
    qh = q.transpose(1, 2)
    if sparse is None:
        out = attention_ref(qh, k_all, v_all, positions)
    else:
        out = infllm_v2_attention_ref(qh, k_all, v_all, positions, sparse)
    if kc is None:
        return out.transpose(1, 2), k_all, v_all
    return out.transpose(1, 2), k_all, v_all, update_compressed_keys(kc, k_all, positions, sparse)


def cpm_attention(q, k, v, k_cache, v_cache, positions, sparse: InfLLMv2Config | None, kc=None):
    """CpmAttention: eager reference, or the plugin node while exporting to ONNX. A sparse layer carries its
    compressed keys kc as a seventh input and fourth output (state, updated in place like the caches)."""
    if not torch.onnx.is_in_onnx_export():
        return cpm_attention_eager(q, k, v, k_cache, v_cache, positions, sparse, kc)
    B, T, H, D = q.shape
    attrs = {**attention_attrs(H, k.shape[2], D, sparse), **plugin_attrs()}
    inputs = [q.reshape(B, T, H * D), k.reshape(B, T, -1), v.reshape(B, T, -1), k_cache, v_cache, positions]
    dtypes, shapes = [q.dtype, k_cache.dtype, v_cache.dtype], [[B, T, H * D], list(k_cache.shape), list(v_cache.shape)]
    if kc is not None:
        inputs, dtypes, shapes = inputs + [kc], dtypes + [kc.dtype], shapes + [list(kc.shape)]
    outs = torch.onnx.ops.symbolic_multi_out(f"{NAMESPACE}::{ATTENTION_OP}", inputs, attrs, dtypes=dtypes,
                                             shapes=shapes, version=ONNX_DOMAIN_VERSION)
    return (outs[0].reshape(B, T, H, D), *outs[1:])


def cpm_ternary_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, in_features: int,
                     group_size: int, layout_kind: str) -> torch.Tensor:
    """CpmTernaryGemm: y = x @ W^T from 2-bit codes. packed is the uint8 code matrix viewed as int8 (TensorRT
    widens uint8 initializers to int32); group_size 0 means one scale per row."""
    from trt_plugins.ternary.reference import TernaryLayout

    if not torch.onnx.is_in_onnx_export():
        layout = TernaryLayout(layout_kind, group_size or in_features)
        return ternary_linear_ref(x, PackedTernary(packed.view(torch.uint8), scales, in_features, layout))
    attrs = {"in_features": in_features, "out_features": packed.shape[0], "group_size": group_size,
             **plugin_attrs()}
    return torch.onnx.ops.symbolic(f"{NAMESPACE}::{TERNARY_OP}", [x, packed, scales], attrs, dtype=x.dtype,
                                   shape=[*x.shape[:-1], packed.shape[0]], version=ONNX_DOMAIN_VERSION)


def cpm_int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  in_features: int, group_size: int) -> torch.Tensor:
    """CpmInt4Gemm: y = x @ W^T from nibble-packed 4-bit codes (trt_plugins/int4/reference.py). qweight
    (N, K / 2) and zeros (N, ceil(G / 2)) are the uint8 tensors viewed as int8 (TensorRT widens uint8
    initializers to int32); an empty zeros means symmetric weights (zero point 8), and the node then has
    three inputs. x is already in the weight's column order (act-order's gather comes before)."""
    from trt_plugins.int4.reference import PackedInt4, int4_linear_ref

    has_zeros = zeros.numel() > 0
    if not torch.onnx.is_in_onnx_export():
        packed = PackedInt4(qweight.view(torch.uint8), scales, zeros.view(torch.uint8) if has_zeros else None,
                            in_features, group_size)
        return int4_linear_ref(x, packed)
    attrs = {"in_features": in_features, "out_features": qweight.shape[0], "group_size": group_size,
             "has_zeros": int(has_zeros), **plugin_attrs()}
    inputs = [x, qweight, scales] + ([zeros] if has_zeros else [])
    return torch.onnx.ops.symbolic(f"{NAMESPACE}::{INT4_OP}", inputs, attrs, dtype=x.dtype,
                                   shape=[*x.shape[:-1], qweight.shape[0]], version=ONNX_DOMAIN_VERSION)
