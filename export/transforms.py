"""Features as transforms of a built model: sparse attention, packed ternary weights."""
from __future__ import annotations

import functools

import torch

from export.model import MiniCPM


def use_sparse_attention(model: MiniCPM, impl: str = "reference") -> MiniCPM:
    """Route every layer's attention through InfLLM v2 with the model's sparse_config.

    impl: "reference" (torch, any device) or "triton" (the Triton kernels; CUDA, or CPU under
    TRITON_INTERPRET=1).
    """
    cfg = model.config.sparse
    if cfg is None:
        raise ValueError("this model has no sparse_config: nothing to make sparse")
    if impl == "reference":
        from trt_plugins.attention.reference import infllm_v2_attention_ref as fn
    elif impl == "triton":
        if cfg.revision != 1:
            raise ValueError(f"sparse_config.revision {cfg.revision}: the Triton kernels implement revision 1 only")
        from trt_plugins.attention.kernels import infllm_v2_attention as fn
    else:
        raise ValueError(f"impl must be 'reference' or 'triton', got {impl!r}")
    for layer in model.layers:
        layer.self_attn.attend = functools.partial(fn, cfg=cfg)
    return model


TERNARY_PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                       "mlp": ("gate_proj", "up_proj", "down_proj")}


class TernaryLinear(torch.nn.Module):
    """A linear layer that keeps only 2-bit codes and scales (BitCPM4), computing x @ W^T from them.

    impl "reference" goes through trt_plugins.ops.cpm_ternary_gemm: the torch reference when run, the
    CpmTernaryGemm plugin node when exported to ONNX. "triton" runs the Triton kernel.
    """

    def __init__(self, packed, impl: str):
        super().__init__()
        if impl not in ("reference", "triton"):
            raise ValueError(f"impl must be 'reference' or 'triton', got {impl!r}")
        self.register_buffer("packed", packed.packed.view(torch.int8))  # int8: TensorRT widens uint8 to int32
        self.register_buffer("scales", packed.scales)
        self.in_features, self.layout, self.impl = packed.in_features, packed.layout, impl

    def forward(self, x):
        if self.impl == "triton":
            from trt_plugins.ternary.kernels import ternary_linear
            from trt_plugins.ternary.reference import PackedTernary
            return ternary_linear(x, PackedTernary(self.packed.view(torch.uint8), self.scales, self.in_features,
                                                   self.layout))
        from trt_plugins.ops import cpm_ternary_gemm
        group = self.layout.group_size if self.layout.kind == "group" else 0
        return cpm_ternary_gemm(x, self.packed, self.scales, self.in_features, group, self.layout.kind)


def pack_ternary(model: MiniCPM, impl: str = "reference") -> MiniCPM:
    """Replace every attention and MLP projection by its packed ternary form (embeddings, norms and the
    lm_head stay float). Raises NotTernaryError naming the first weight that is not ternary."""
    from trt_plugins.ternary.reference import pack

    for i, layer in enumerate(model.layers):
        for block_name, projections in TERNARY_PROJECTIONS.items():
            block = getattr(layer, block_name)
            for name in projections:
                weight = getattr(block, name).weight.data
                packed = pack(weight, name=f"model.layers.{i}.{block_name}.{name}.weight")
                setattr(block, name, TernaryLinear(packed, impl))
    return model
