"""TensorRT plugins for the kit's ONNX nodes: CpmAttention, CpmTernaryGemm and CpmInt4Gemm (IPluginV3 +
IPluginCreatorV3One).

Small adapters: validate shapes and types strictly at build time; at run time build the op's launch plan
(trt_plugins/plans.py, the same function the Triton wrappers and the CPU tests execute) and hand it to the
CUDA executor (trt_plugins/cuda_launch.py: the cubins of `cpm-edge kernels compile`, launched through
cuda-python on TensorRT's stream), with no allocation and no synchronisation, so a decode step can be
captured in a CUDA graph.
CpmAttention's cache outputs alias its cache inputs (IPluginV3OneBuildV2.get_aliased_input): the new keys and
values are written in place.

Works with TensorRT 10.x/11.x (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx`), whose ONNX parser accepts
only V3 plugins with V3One creators. cuda-python is imported only when a plugin first runs on a GPU.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np

from trt_plugins import names as ops  # torch-free: names, attributes, InfLLM v2 settings
from trt_plugins import plans

log = logging.getLogger(__name__)
KERNEL_DIR_ENV = "CPM_EDGE_KERNELS"  # folder with <sm>/<config>.cubin/.json (the bundle's kernels/)


class TensorRTMissing(RuntimeError):
    """Neither TensorRT nor TensorRT-RTX can be imported."""


def import_tensorrt(prefer: str = "any"):
    """The TensorRT module: `tensorrt` (JetPack, full TensorRT) or `tensorrt_rtx`. prefer: any|tensorrt|rtx."""
    names = {"tensorrt": ["tensorrt"], "rtx": ["tensorrt_rtx"], "any": ["tensorrt", "tensorrt_rtx"]}[prefer]
    for name in names:
        if importlib.util.find_spec(name) is None:
            continue
        if name == "tensorrt_rtx":
            _link_rtx_library()
        module = __import__(name)
        if hasattr(module, "Builder"):  # the PyPI 'tensorrt' placeholder has no bindings
            return module
    raise TensorRTMissing(f"no TensorRT Python module ({' or '.join(names)}) is installed: on a Jetson it comes "
                          f"with JetPack (python3-libnvinfer); elsewhere `pip install tensorrt-rtx-cu13`")


def _link_rtx_library():
    """TensorRT-RTX's ONNX parser dlopens 'libtensorrt_rtx.so' when it meets a plugin node, but the wheel
    ships only 'libtensorrt_rtx.so.1'; without the unversioned name the process aborts. Add the link beside it."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(list(spec.submodule_search_locations)[0])
    link = folder / "libtensorrt_rtx.so"
    if not link.exists() and (folder / "libtensorrt_rtx.so.1").exists():
        try:
            link.symlink_to("libtensorrt_rtx.so.1")
        except OSError as e:
            raise TensorRTMissing(f"{link}: cannot create the link TensorRT-RTX's parser needs ({e.strerror}); "
                                  f"create it once: ln -s libtensorrt_rtx.so.1 {link}") from None


# --- run time: kernels compiled ahead of time -----------------------------------------------------------
_KERNELS: dict[str, object] = {}


def gpu_kernels():
    """The CUDA executor (trt_plugins/cuda_launch.py) over $CPM_EDGE_KERNELS/<sm_XY>/ for this GPU."""
    from trt_plugins.cuda_launch import CudaKernels  # cuda-python: the device's dependency only

    root = os.environ.get(KERNEL_DIR_ENV)
    if not root:
        raise RuntimeError(f"{KERNEL_DIR_ENV} is not set: the tensorrt backend points it at the bundle's kernels/")
    if root not in _KERNELS:
        _KERNELS[root] = CudaKernels.for_this_gpu(Path(root))
    return _KERNELS[root]


def attention_plan_for(sparse, dims_q, dims_cache, dims_kc, dtype: str):
    """The CpmAttention plan for these tensor shapes (plans.attention_plan; cached there)."""
    B, T, HD = (int(d) for d in dims_q)
    _, Hkv, S, D = (int(d) for d in dims_cache)
    kernels = int(dims_kc[2]) if dims_kc is not None else -1
    return plans.attention_plan(plans.AttentionShape(B, T, HD // D, Hkv, S, D, kernels), dtype, sparse)


def _dtype_name(trt, dtype) -> str:
    return {trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16", trt.DataType.FLOAT: "fp32"}[dtype]


def build_plugin_classes(trt):
    """The plugin and creator classes for one TensorRT module (their bases come from it)."""

    def fields_to_dict(fc) -> dict:
        out = {}
        for f in fc:
            data = f.data
            if f.type == trt.PluginFieldType.CHAR:
                out[f.name] = bytes(np.asarray(data, dtype=np.int8).view(np.uint8)).split(b"\0")[0].decode()
            else:
                out[f.name] = np.array(data, copy=True)
        return out

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuildV2, trt.IPluginV3OneRuntime):
        NAME = ""
        FIELDS: tuple = ()

        def __init__(self, values: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuildV2.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = self.NAME, ops.PLUGIN_VERSION, ops.NAMESPACE
            self.timing_cache_id = self.metadata_string = ""
            self.values = dict(values)

        def get_capability_interface(self, kind):
            return self

        def clone(self):
            return type(self)(self.values)

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_valid_tactics(self):
            return []

        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inputs, outputs):
            pass  # enqueue reads the shapes it needs from its tensor descriptions

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([
                trt.PluginField(name, np.array([int(self.values[name])], dtype=np.int32), trt.PluginFieldType.INT32)
                for name in self.FIELDS])

        def destroy(self):
            pass

        FIXED_TYPES: dict = {}  # input position -> the one dtype it takes; the others share q's/x's dtype

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos in self.FIXED_TYPES:
                return desc.type == getattr(trt.DataType, self.FIXED_TYPES[pos])
            if pos == 0:
                return desc.type in (trt.DataType.HALF, trt.DataType.BF16)
            return desc.type == in_out[0].desc.type

    class AttentionPlugin(Plugin):
        """CpmAttention: inputs q (B,T,H*D), k, v (B,T,Hkv*D), k_cache, v_cache (B,Hkv,S,D), positions (B,T)
        int64 [, kc (B,Hkv,NK,D) fp32 for InfLLM v2]; outputs attention (B,T,H*D) and the state (aliases of
        inputs 3, 4 [, 6]). enqueue runs plans.attention_plan through the CUDA executor."""
        NAME = ops.ATTENTION_OP
        FIELDS = tuple(ops.attention_attrs(1, 1, 64, None))

        def __init__(self, values):
            super().__init__(values)
            self.sparse = ops.config_from_attrs(self.values)
            self.num_outputs = 4 if self.sparse else 3
            # positions; with InfLLM v2 the compressed keys in (input 6) and out (position 7 + 3)
            self.FIXED_TYPES = {5: "INT64", 6: "FLOAT", 10: "FLOAT"} if self.sparse else {5: "INT64"}

        def get_aliased_input(self, output_index):
            return {1: 3, 2: 4, 3: 6}.get(output_index, -1)

        def get_output_data_types(self, input_types):
            return [input_types[0], input_types[3], input_types[4]] + ([input_types[6]] if self.sparse else [])

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[i]) for i in ((0, 3, 4, 6) if self.sparse else (0, 3, 4))]

        def get_workspace_size(self, inputs, outputs):
            kc = inputs[6].max if self.sparse else None  # the workspace (fp32/int32 slices) is the same for any dtype
            return attention_plan_for(self.sparse, inputs[0].max, inputs[3].max, kc, "fp16").workspace_bytes

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            dtype = _dtype_name(trt, input_desc[0].type)
            plan = attention_plan_for(self.sparse, input_desc[0].dims, input_desc[3].dims,
                                      input_desc[6].dims if self.sparse else None, dtype)
            names = ["q", "k", "v", "k_cache", "v_cache", "positions"] + (["kc"] if self.sparse else [])
            addresses = {name: int(ptr) for name, ptr in zip(names, inputs)}
            addresses["out"] = int(outputs[0])  # outputs 1.. alias the state inputs: written in place
            gpu_kernels().run(plan, addresses, int(workspace), int(stream))

    class TernaryGemmPlugin(Plugin):
        """CpmTernaryGemm: inputs x (..., K), packed int8 (N, K_pad/4), scales fp32 (N, G); output (..., N)."""
        NAME = ops.TERNARY_OP
        FIELDS = ("in_features", "out_features", "group_size")
        FIXED_TYPES = {1: "INT8", 2: "FLOAT"}  # packed codes, scales

        def __init__(self, values):
            super().__init__(values)
            self.num_outputs = 1

        def get_aliased_input(self, output_index):
            return -1

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            out = trt.DimsExprs(inputs[0])
            out[len(out) - 1] = expr_builder.constant(int(self.values["out_features"]))
            return [out]

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            dims = [int(d) for d in input_desc[0].dims]
            N, packed_cols = (int(d) for d in input_desc[1].dims)
            plan = plans.ternary_plan(int(np.prod(dims[:-1])), N, dims[-1], packed_cols, int(input_desc[2].dims[1]),
                                      int(self.values["group_size"]), _dtype_name(trt, input_desc[0].type))
            addresses = {"x": int(inputs[0]), "packed": int(inputs[1]), "scales": int(inputs[2]), "y": int(outputs[0])}
            gpu_kernels().run(plan, addresses, int(workspace), int(stream))

    class Int4GemmPlugin(Plugin):
        """CpmInt4Gemm: inputs x (..., K) fp16/bf16, qweight int8 (N, K/2), scales (N, G) in x's dtype [, zeros
        int8 (N, ceil(G/2)) when has_zeros]; output (..., N). enqueue runs plans.int4_plan."""
        NAME = ops.INT4_OP
        FIELDS = ("in_features", "out_features", "group_size", "has_zeros")

        def __init__(self, values):
            super().__init__(values)
            self.num_outputs = 1
            self.has_zeros = bool(self.values["has_zeros"])
            self.FIXED_TYPES = {1: "INT8", 3: "INT8"} if self.has_zeros else {1: "INT8"}  # codes, zero points

        def get_aliased_input(self, output_index):
            return -1

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            if len(inputs) != 3 + self.has_zeros:
                raise ValueError(f"{ops.INT4_OP}: {len(inputs)} inputs, expected {3 + self.has_zeros} "
                                 f"(has_zeros={int(self.has_zeros)})")
            out = trt.DimsExprs(inputs[0])
            out[len(out) - 1] = expr_builder.constant(int(self.values["out_features"]))
            return [out]

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            dims = [int(d) for d in input_desc[0].dims]
            plan = plans.int4_plan(int(np.prod(dims[:-1])), int(input_desc[1].dims[0]), dims[-1],
                                   int(self.values["group_size"]), self.has_zeros, _dtype_name(trt, input_desc[0].type))
            addresses = {"x": int(inputs[0]), "qweight": int(inputs[1]), "scales": int(inputs[2]), "y": int(outputs[0])}
            if self.has_zeros:
                addresses["zeros"] = int(inputs[3])
            gpu_kernels().run(plan, addresses, int(workspace), int(stream))

    class Creator(trt.IPluginCreatorV3One):
        PLUGIN = Plugin

        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_version, self.plugin_namespace = (self.PLUGIN.NAME, ops.PLUGIN_VERSION,
                                                                      ops.NAMESPACE)
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(n, np.array([]), trt.PluginFieldType.INT32) for n in self.PLUGIN.FIELDS])

        def create_plugin(self, name, fc, phase):
            values = fields_to_dict(fc)
            missing = [f for f in self.PLUGIN.FIELDS if f not in values]
            if missing:
                raise ValueError(f"{self.PLUGIN.NAME} node {name}: attribute(s) {missing} missing")
            return self.PLUGIN({k: int(np.asarray(values[k]).reshape(-1)[0]) for k in self.PLUGIN.FIELDS})

    class AttentionCreator(Creator):
        PLUGIN = AttentionPlugin

    class TernaryGemmCreator(Creator):
        PLUGIN = TernaryGemmPlugin

    class Int4GemmCreator(Creator):
        PLUGIN = Int4GemmPlugin

    return [AttentionCreator, TernaryGemmCreator, Int4GemmCreator]


_REGISTERED: dict[str, list] = {}  # module name -> creator objects, kept alive for the process


def register_plugins(trt) -> list:
    """Register the kit's creators with this TensorRT module's plugin registry (once per process)."""
    if trt.__name__ in _REGISTERED:
        return _REGISTERED[trt.__name__]
    registry = trt.get_plugin_registry()
    creators = []
    for cls in build_plugin_classes(trt):
        creator = cls()
        present = any(c.name == creator.name and c.plugin_namespace == ops.NAMESPACE for c in registry.all_creators)
        if not present and not registry.register_creator(creator, ops.NAMESPACE):
            raise RuntimeError(f"TensorRT refused to register the {creator.name} plugin creator")
        creators.append(creator)
    _REGISTERED[trt.__name__] = creators
    return creators
