"""Run a trt-flavor graph in ONNX Runtime on CPU, the plugin nodes computed by the torch references.

This is how the host proves a trt-flavor export computes what the torch model does before any TensorRT is
involved. onnxruntime-extensions runs Python ops only in its own domain, so `graph_for_onnxruntime` writes a
copy of the graph whose cpm_edge nodes are moved there; nothing else changes.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from trt_plugins import ops

CONTRIB_DOMAIN = "ai.onnx.contrib"


@functools.lru_cache(maxsize=1)
def register_reference_ops() -> str:
    """Register CpmAttention and CpmTernaryGemm as Python ops; returns the library path for SessionOptions."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    f32, i64, i8, s = (PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_int8,
                       PyCustomOpDef.dt_string)
    attention_attrs = {k: i64 for k in ops.attention_attrs(1, 1, 64, None)}
    attention_attrs.update(plugin_version=s, plugin_namespace=s)

    @onnx_op(op_type=ops.ATTENTION_OP, inputs=[f32, f32, f32, f32, f32, i64], outputs=[f32, f32, f32],
             attrs=attention_attrs)
    def cpm_attention(q, k, v, k_cache, v_cache, positions, **attrs):
        H, Hkv, D = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
        B, T = positions.shape
        out, k_all, v_all = ops.cpm_attention_eager(
            torch.from_numpy(q).view(B, T, H, D), torch.from_numpy(k).view(B, T, Hkv, D),
            torch.from_numpy(v).view(B, T, Hkv, D), torch.from_numpy(k_cache), torch.from_numpy(v_cache),
            torch.from_numpy(positions), ops.config_from_attrs(attrs))
        return out.reshape(B, T, H * D).numpy(), k_all.numpy(), v_all.numpy()

    @onnx_op(op_type=ops.TERNARY_OP, inputs=[f32, i8, f32], outputs=[f32],
             attrs={"in_features": i64, "out_features": i64, "group_size": i64, "plugin_version": s,
                    "plugin_namespace": s})
    def cpm_ternary_gemm(x, packed, scales, **attrs):
        group = int(attrs["group_size"])
        kind = "group" if group else "row"
        y = ops.cpm_ternary_gemm(torch.from_numpy(x), torch.from_numpy(packed), torch.from_numpy(scales),
                                 int(attrs["in_features"]), group, kind)
        return y.numpy().astype(np.float32)

    return get_library_path()


def graph_for_onnxruntime(export_dir: Path, out_dir: Path) -> Path:
    """Copy an export folder, moving the plugin nodes into the domain onnxruntime-extensions serves."""
    import shutil

    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(export_dir).iterdir():
        if item.name != "model.onnx":
            shutil.copy2(item, out_dir / item.name)
    model = onnx.load(str(Path(export_dir) / "model.onnx"))
    for node in model.graph.node:
        if node.domain == ops.NAMESPACE:
            node.domain = CONTRIB_DOMAIN
    imports = [o for o in model.opset_import if o.domain != ops.NAMESPACE]
    del model.opset_import[:]
    model.opset_import.extend(imports + [onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    onnx.save(model, str(out_dir / "model.onnx"))
    return out_dir


def session_options():
    """onnxruntime SessionOptions with the reference ops registered."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.register_custom_ops_library(register_reference_ops())
    return so
