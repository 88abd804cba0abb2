"""Run a trt-flavor graph in ONNX Runtime on CPU, its plugin nodes computed one of two ways:
  reference    the torch references (trt_plugins/ops.py): fast, the definition
  interpreter  the plugins' own launch plans (trt_plugins/plans.py) executed with the Triton kernels in
               Triton's interpreter: the same launches, arguments, grids and workspace layout the TensorRT
               plugin hands the GPU, so a trt-flavor export is proven end to end on a machine without one.
onnxruntime-extensions runs Python ops only in its own domain, so `graph_for_onnxruntime` writes a copy of
the graph whose cpm_edge nodes are moved there (and a sparse CpmAttention, which carries InfLLM v2's
compressed keys as a seventh input, and a symmetric CpmInt4Gemm, which has no zero points, get op names of
their own: one Python op has one input count).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

from trt_plugins import ops

CONTRIB_DOMAIN = "ai.onnx.contrib"
SPARSE_ATTENTION_OP = ops.ATTENTION_OP + "Sparse"  # ONNX Runtime only; TensorRT sees CpmAttention
INT4_SYMMETRIC_OP = ops.INT4_OP + "Symmetric"      # ONNX Runtime only: CpmInt4Gemm without zero points
PLUGIN_MODES = ("reference", "interpreter")
_MODE = {"plugins": "reference"}  # the Python ops read it at each call; set by session_options()


def _attention(q, k, v, k_cache, v_cache, positions, kc, attrs):
    H, Hkv, D = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
    B, T = positions.shape
    sparse = ops.config_from_attrs(attrs)
    tq, tk, tv, tpos = (torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(positions))
    if _MODE["plugins"] == "interpreter":
        from trt_plugins.attention.kernels import cpm_attention

        state = [torch.from_numpy(np.array(a)) for a in (k_cache, v_cache)]  # written in place, as the plugin does
        ckeys = torch.from_numpy(np.array(kc)) if kc is not None else None
        out = cpm_attention(tq, tk, tv, *state, tpos, ckeys, sparse)
        outs = [out, *state] + ([ckeys] if ckeys is not None else [])
    else:
        kc_t = torch.from_numpy(kc) if kc is not None else None
        outs = list(ops.cpm_attention_eager(tq.view(B, T, H, D), tk.view(B, T, Hkv, D), tv.view(B, T, Hkv, D),
                                            torch.from_numpy(k_cache), torch.from_numpy(v_cache), tpos, sparse, kc_t))
        outs[0] = outs[0].reshape(B, T, H * D)
    return tuple(o.numpy() for o in outs)


def _ternary(x, packed, scales, attrs):
    group = int(attrs["group_size"])
    kind = "group" if group else "row"
    tx, tp, ts = torch.from_numpy(x), torch.from_numpy(packed), torch.from_numpy(scales)
    if _MODE["plugins"] == "interpreter":
        from trt_plugins.ternary.kernels import ternary_linear
        from trt_plugins.ternary.reference import PackedTernary, TernaryLayout

        layout = TernaryLayout(kind, group or int(attrs["in_features"]))
        y = ternary_linear(tx, PackedTernary(tp.view(torch.uint8), ts, int(attrs["in_features"]), layout))
    else:
        y = ops.cpm_ternary_gemm(tx, tp, ts, int(attrs["in_features"]), group, kind)
    return y.numpy().astype(np.float32)


def _int4(x, qweight, scales, zeros, attrs):
    tx, tq, ts = torch.from_numpy(x), torch.from_numpy(qweight), torch.from_numpy(scales)
    tz = torch.from_numpy(zeros) if zeros is not None else torch.empty(0, dtype=torch.int8)
    K, group = int(attrs["in_features"]), int(attrs["group_size"])
    if _MODE["plugins"] == "interpreter":
        from trt_plugins.int4.kernels import int4_linear
        from trt_plugins.int4.reference import PackedInt4

        y = int4_linear(tx, PackedInt4(tq.view(torch.uint8), ts, tz.view(torch.uint8) if zeros is not None else None,
                                       K, group))
    else:
        y = ops.cpm_int4_gemm(tx, tq, ts, tz, K, group)
    return y.numpy().astype(np.float32)


@functools.lru_cache(maxsize=1)
def register_ops() -> str:
    """Register CpmAttention (dense and sparse), CpmTernaryGemm and CpmInt4Gemm (with and without zero
    points) as Python ops; returns the library path."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    f32, i64, i8, s = (PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64, PyCustomOpDef.dt_int8,
                       PyCustomOpDef.dt_string)
    attention_attrs = {k: i64 for k in ops.attention_attrs(1, 1, 64, None)}
    attention_attrs.update(plugin_version=s, plugin_namespace=s)

    @onnx_op(op_type=ops.ATTENTION_OP, inputs=[f32, f32, f32, f32, f32, i64], outputs=[f32, f32, f32],
             attrs=attention_attrs)
    def cpm_attention(q, k, v, k_cache, v_cache, positions, **attrs):
        return _attention(q, k, v, k_cache, v_cache, positions, None, attrs)

    @onnx_op(op_type=SPARSE_ATTENTION_OP, inputs=[f32, f32, f32, f32, f32, i64, f32],
             outputs=[f32, f32, f32, f32], attrs=attention_attrs)
    def cpm_attention_sparse(q, k, v, k_cache, v_cache, positions, kc, **attrs):
        return _attention(q, k, v, k_cache, v_cache, positions, kc, attrs)

    @onnx_op(op_type=ops.TERNARY_OP, inputs=[f32, i8, f32], outputs=[f32],
             attrs={"in_features": i64, "out_features": i64, "group_size": i64, "plugin_version": s,
                    "plugin_namespace": s})
    def cpm_ternary_gemm(x, packed, scales, **attrs):
        return _ternary(x, packed, scales, attrs)

    int4_attrs = {"in_features": i64, "out_features": i64, "group_size": i64, "has_zeros": i64,
                  "plugin_version": s, "plugin_namespace": s}

    @onnx_op(op_type=ops.INT4_OP, inputs=[f32, i8, f32, i8], outputs=[f32], attrs=int4_attrs)
    def cpm_int4_gemm(x, qweight, scales, zeros, **attrs):
        return _int4(x, qweight, scales, zeros, attrs)

    @onnx_op(op_type=INT4_SYMMETRIC_OP, inputs=[f32, i8, f32], outputs=[f32], attrs=int4_attrs)
    def cpm_int4_gemm_symmetric(x, qweight, scales, **attrs):
        return _int4(x, qweight, scales, None, attrs)

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
            if node.op_type == ops.ATTENTION_OP and len(node.input) == 7:
                node.op_type = SPARSE_ATTENTION_OP
            if node.op_type == ops.INT4_OP and len(node.input) == 3:
                node.op_type = INT4_SYMMETRIC_OP
    imports = [o for o in model.opset_import if o.domain != ops.NAMESPACE]
    del model.opset_import[:]
    model.opset_import.extend(imports + [onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    onnx.save(model, str(out_dir / "model.onnx"))
    return out_dir


def session_options(plugins: str = "reference"):
    """onnxruntime SessionOptions with the plugin ops registered, computed by `plugins` (PLUGIN_MODES).
    The mode is per process (the Python ops are registered once); interpreter needs TRITON_INTERPRET=1
    set before Triton is first imported (`cpm-edge generate --plugins interpreter` does)."""
    import onnxruntime as ort

    if plugins not in PLUGIN_MODES:
        raise ValueError(f"--plugins: {plugins!r} is not one of {', '.join(PLUGIN_MODES)}")
    if plugins == "interpreter" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("--plugins interpreter: set TRITON_INTERPRET=1 before Triton is imported")
    _MODE["plugins"] = plugins
    so = ort.SessionOptions()
    so.register_custom_ops_library(register_ops())
    return so
