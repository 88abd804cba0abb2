"""What ties an ONNX node to its TensorRT plugin: op names, namespace, version, attributes. No torch here:
the device's TensorRT backend registers the plugins from these."""
from __future__ import annotations

from trt_plugins.attention.config import InfLLMv2Config

NAMESPACE = "cpm_edge"        # ONNX domain, TensorRT plugin namespace
PLUGIN_VERSION = "1"
ATTENTION_OP = "CpmAttention"
TERNARY_OP = "CpmTernaryGemm"
INT4_OP = "CpmInt4Gemm"
ONNX_DOMAIN_VERSION = 1


def plugin_attrs() -> dict:
    return {"plugin_version": PLUGIN_VERSION, "plugin_namespace": NAMESPACE}


def attention_attrs(n_heads: int, n_kv_heads: int, head_dim: int, sparse: InfLLMv2Config | None) -> dict:
    attrs = {"num_heads": n_heads, "num_kv_heads": n_kv_heads, "head_dim": head_dim, "sparse": int(sparse is not None)}
    s = sparse or InfLLMv2Config()
    attrs.update({"kernel_size": s.kernel_size, "kernel_stride": s.kernel_stride, "init_blocks": s.init_blocks,
                  "block_size": s.block_size, "window_size": s.window_size, "topk": s.topk,
                  "dense_len": s.dense_len})
    return attrs


def config_from_attrs(attrs: dict) -> InfLLMv2Config | None:
    """The InfLLM v2 settings a CpmAttention node carries (None: dense attention)."""
    if not attrs.get("sparse"):
        return None
    return InfLLMv2Config(**{k: int(attrs[k]) for k in ("kernel_size", "kernel_stride", "init_blocks",
                                                          "block_size", "window_size", "topk", "dense_len")})
