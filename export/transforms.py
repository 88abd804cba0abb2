"""Features as transforms of a built model: sparse attention, packed ternary weights."""
from __future__ import annotations

import functools

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
        from trt_plugins.attention.kernels import infllm_v2_attention as fn
    else:
        raise ValueError(f"impl must be 'reference' or 'triton', got {impl!r}")
    for layer in model.layers:
        layer.self_attn.attend = functools.partial(fn, cfg=cfg)
    return model
