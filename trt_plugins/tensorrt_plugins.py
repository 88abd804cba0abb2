"""TensorRT plugins for the kit's ONNX nodes: CpmAttention and CpmTernaryGemm (IPluginV3 + IPluginCreatorV3One).

Small adapters: validate shapes and types strictly at build time, and at run time launch the Triton kernels
compiled ahead of time for the device's SM (cubins of `cpm-edge kernels compile`, loaded with pycuda) on
TensorRT's stream, with no allocation and no synchronisation, so a decode step can be captured in a CUDA graph.
CpmAttention's cache outputs alias its cache inputs (IPluginV3OneBuildV2.get_aliased_input): the new keys and
values are written in place.

Works with TensorRT 10.x/11.x (`tensorrt`) and TensorRT-RTX (`tensorrt_rtx`), whose ONNX parser accepts
only V3 plugins with V3One creators. pycuda is imported only when a plugin first runs on a GPU.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np

from trt_plugins import names as ops  # torch-free: names, attributes, InfLLM v2 settings

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
class KernelLibrary:
    """Cubins of one SM, loaded on first use (one CUDA module per configuration)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._functions = {}

    def find(self, prefix: str, suffix: str) -> str:
        """The name of a compiled configuration that starts and ends so (e.g. any block size)."""
        names = sorted(p.stem for p in self.folder.glob(f"{prefix}*{suffix}.json"))
        if not names:
            raise RuntimeError(f"{self.folder}: no kernel {prefix}*{suffix}; compile the kernels for this model "
                               f"(cpm-edge kernels compile --model MODEL_DIR)")
        return names[0]

    def launch(self, config: str, grid: tuple, args: list, stream: int):
        import pycuda.driver as cuda  # the device's dependency only

        if config not in self._functions:
            meta = json.loads((self.folder / f"{config}.json").read_text())
            module = cuda.module_from_buffer((self.folder / f"{config}.cubin").read_bytes())
            function = module.get_function(meta["entry"])
            if meta["shared_bytes"] > 48 * 1024:
                function.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, meta["shared_bytes"])
            self._functions[config] = (module, function, meta)
        _, function, meta = self._functions[config]
        if len(args) != len(meta["args"]):
            raise RuntimeError(f"{config}: {len(args)} arguments for {len(meta['args'])} ({', '.join(meta['args'])})")
        scratch = [np.uintp(0)] * (meta["params"] - len(meta["args"]))  # Triton's scratch pointers: unused
        function(*args, *scratch, grid=(grid[0], grid[1] if len(grid) > 1 else 1, 1),
                 block=(meta["threads"], 1, 1), shared=meta["shared_bytes"], stream=cuda.Stream(handle=stream))


_LIBRARIES: dict[str, KernelLibrary] = {}


def kernel_library() -> KernelLibrary:
    """The cubins for this GPU, from $CPM_EDGE_KERNELS/<sm_XY>/ (set by the tensorrt backend)."""
    import pycuda.autoinit  # noqa: F401  (a context on the device TensorRT runs on)
    import pycuda.driver as cuda

    major, minor = cuda.Device(0).compute_capability()
    root = os.environ.get(KERNEL_DIR_ENV)
    if not root:
        raise RuntimeError(f"{KERNEL_DIR_ENV} is not set: the tensorrt backend points it at the bundle's kernels/")
    folder = Path(root) / f"sm_{major}{minor}"
    if not folder.is_dir():
        raise RuntimeError(f"{folder}: no kernels compiled for this GPU (sm_{major}{minor}); rebuild the bundle "
                           f"for this device (cpm-edge engine --device ...)")
    return _LIBRARIES.setdefault(str(folder), KernelLibrary(folder))


SPARSE_CHUNK = 256  # tokens per stage-1/selection pass: bounds the workspace of a long prefill


def nb_pad(n_blocks: int) -> int:
    """The compiled width of a selection row (selection.nb_pad, without importing Triton)."""
    return max(16, 1 << (n_blocks - 1).bit_length())


def sparse_buffers(cfg, B: int, Hkv: int, S: int, D: int) -> tuple[int, int, int, int]:
    """Workspace bytes for InfLLM v2: compressed keys, stage-1 scores, block lists, counts (256-aligned)."""
    n_kernels = max(0, (S - cfg.kernel_size) // cfg.kernel_stride + 1)
    n_blocks = -(-S // cfg.block_size)
    sizes = (B * Hkv * n_kernels * D * 4, B * Hkv * SPARSE_CHUNK * n_kernels * 4,
             B * Hkv * SPARSE_CHUNK * n_blocks * 4, B * Hkv * SPARSE_CHUNK * 4)
    return tuple(-(-size // 256) * 256 for size in sizes)


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
        int64; outputs attention (B,T,H*D) and the caches (aliases of inputs 3 and 4)."""
        NAME = ops.ATTENTION_OP
        FIELDS = tuple(ops.attention_attrs(1, 1, 64, None))
        FIXED_TYPES = {5: "INT64"}  # positions

        def __init__(self, values):
            super().__init__(values)
            self.num_outputs = 3
            self.sparse = ops.config_from_attrs(self.values)

        def get_aliased_input(self, output_index):
            return {1: 3, 2: 4}.get(output_index, -1)

        def get_output_data_types(self, input_types):
            return [input_types[0], input_types[3], input_types[4]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0]), trt.DimsExprs(inputs[3]), trt.DimsExprs(inputs[4])]

        def get_workspace_size(self, inputs, outputs):
            if self.sparse is None:
                return 0
            B, Hkv, S, D = inputs[3].max
            return sum(sparse_buffers(self.sparse, B, Hkv, S, D))

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            lib = kernel_library()
            B, T, HD = input_desc[0].dims
            _, Hkv, S, D = input_desc[3].dims
            H = HD // D
            group = H // Hkv
            dtype = _dtype_name(trt, input_desc[0].type)
            q, k, v, k_cache, v_cache, positions = (int(p) for p in inputs)
            out = int(outputs[0])
            i32, ptr = np.int32, np.uintp
            new_strides = [T * Hkv * D, Hkv * D, D]             # k, v (B, T, Hkv, D)
            cache_strides = [Hkv * S * D, S * D, D]              # caches (B, Hkv, S, D)
            seq_strides = [T * H * D, D, H * D]                  # q and out (B, T, H*D) as (B, H, T, D)
            scale = np.float32(1.0 / np.sqrt(D))
            for new, cache in ((k, k_cache), (v, v_cache)):     # in place: outputs 1, 2 alias inputs 3, 4
                lib.launch(f"cache_write_kernel_{dtype}_head_dim{D}", (T, B * Hkv),
                           [ptr(new), ptr(cache), ptr(positions), *map(i32, new_strides),
                            *map(i32, cache_strides), i32(T), i32(Hkv)], stream)
            if self.sparse is None:
                config = lib.find(f"block_attention_kernel_{dtype}_group{group}_head_dim{D}_block_n", "_dense1")
                lib.launch(config, (T, B * Hkv),
                           [ptr(q), ptr(k_cache), ptr(v_cache), ptr(out), ptr(positions), ptr(0), ptr(0),
                            *map(i32, seq_strides), *map(i32, cache_strides), *map(i32, cache_strides),
                            *map(i32, seq_strides), i32(T),          # positions (B, T)
                            i32(0), i32(0), i32(0), i32(0), i32(0),   # block list and counts: unused when dense
                            i32(Hkv), scale], stream)
                return
            # InfLLM v2: compressed keys, then per chunk of tokens stage-1 scores, selection, block attention.
            cfg = self.sparse
            n_kernels = max(0, (S - cfg.kernel_size) // cfg.kernel_stride + 1)
            n_blocks = -(-S // cfg.block_size)
            kc_bytes, score_bytes, idx_bytes, _ = sparse_buffers(cfg, B, Hkv, S, D)
            kc, scores = int(workspace), int(workspace) + kc_bytes
            idx, cnt = scores + score_bytes, scores + score_bytes + idx_bytes
            kc_strides = [Hkv * n_kernels * D, n_kernels * D, D]
            lib.launch(f"compress_keys_kernel_{dtype}_head_dim{D}_block_j16", (-(-n_kernels // 16), B * Hkv),
                       [ptr(k_cache), ptr(kc), *map(i32, cache_strides), *map(i32, kc_strides), i32(Hkv),
                        i32(n_kernels), i32(cfg.kernel_size), i32(cfg.kernel_stride)], stream)
            stage1 = lib.find(f"stage1_scores_kernel_{dtype}_group{group}_head_dim{D}_block_j", "")
            attend = f"block_attention_kernel_{dtype}_group{group}_head_dim{D}_block_n{cfg.block_size}_dense0"
            select = f"select_blocks_kernel_fp32_ratio{cfg.block_size // cfg.kernel_stride}_nb_pad{nb_pad(n_blocks)}"
            for t0 in range(0, T, SPARSE_CHUNK):
                n = min(SPARSE_CHUNK, T - t0)
                q_t, out_t, pos_t = q + t0 * H * D * 2, out + t0 * H * D * 2, positions + t0 * 8
                score_strides = [Hkv * n * n_kernels, n * n_kernels, n_kernels]
                idx_strides = [Hkv * n * n_blocks, n * n_blocks, n_blocks]
                cnt_strides = [Hkv * n, n]
                lib.launch(stage1, (n, B * Hkv),
                           [ptr(q_t), ptr(kc), ptr(pos_t), ptr(scores), *map(i32, seq_strides), *map(i32, kc_strides),
                            i32(T), *map(i32, score_strides), i32(Hkv), i32(n_kernels), i32(cfg.kernel_size),
                            i32(cfg.kernel_stride), scale], stream)
                lib.launch(select, (n, B * Hkv),
                           [ptr(scores), ptr(pos_t), ptr(idx), ptr(cnt), *map(i32, score_strides), i32(T),
                            *map(i32, idx_strides), *map(i32, cnt_strides), i32(Hkv), i32(n_kernels), i32(T - t0),
                            i32(n_blocks), i32(cfg.block_size), i32(cfg.init_blocks), i32(cfg.window_blocks),
                            i32(cfg.topk - cfg.init_blocks), i32(cfg.dense_len)], stream)
                lib.launch(attend, (n, B * Hkv),
                           [ptr(q_t), ptr(k_cache), ptr(v_cache), ptr(out_t), ptr(pos_t), ptr(idx), ptr(cnt),
                            *map(i32, seq_strides), *map(i32, cache_strides), *map(i32, cache_strides),
                            *map(i32, seq_strides), i32(T), *map(i32, idx_strides), *map(i32, cnt_strides),
                            i32(Hkv), scale], stream)

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
            lib = kernel_library()
            dims = list(input_desc[0].dims)
            K, M = dims[-1], int(np.prod(dims[:-1]))
            N, packed_cols = input_desc[1].dims
            groups = input_desc[2].dims[1]
            dtype = _dtype_name(trt, input_desc[0].type)
            group = int(self.values["group_size"])
            config = f"ternary_matmul_kernel_{dtype}_group{group}_block_m16_block_n64"
            grid = ((N + 63) // 64, (M + 15) // 16)
            lib.launch(config, grid, [np.uintp(inputs[0]), np.uintp(inputs[1]), np.uintp(inputs[2]),
                                      np.uintp(outputs[0]), np.int32(M), np.int32(N), np.int32(K),
                                      np.int32(packed_cols * 4 // 128), np.int32(K), np.int32(packed_cols),
                                      np.int32(groups), np.int32(1), np.int32(N)], stream)

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

    return [AttentionCreator, TernaryGemmCreator]


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
