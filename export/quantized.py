"""4-bit weights as a transform of the built model: GPTQ and AutoAWQ checkpoints as published, or
round-to-nearest at export. Every quantized projection becomes an Int4Linear holding the kit's layout
(trt_plugins/int4/reference.py, the definition of the math).

How a folder says it is quantized: `quantization_config` in config.json (what transformers writes), else
quantize_config.json (auto-gptq / gptqmodel) or quant_config.json (AutoAWQ) beside it. Formats read:
- GPTQ (auto-gptq, gptqmodel): qweight int32 (K/8, N), 8 codes per word along K, low bits first; qzeros int32
  (G, N/8) along N; scales fp16 (G, N); g_idx int32 (K,) (act-order when not k // g). Format "gptq" (v1)
  stores zero - 1, "gptq_v2" the zero itself (gptqmodel's `format` / `checkpoint_format`).
- AutoAWQ GEMM: qweight int32 (K, N/8) and qzeros int32 (G, N/8), 8 codes per word along N in AWQ's order
  [0, 2, 4, 6, 1, 3, 5, 7]; scales fp16 (G, N); the zero point as stored.
Anything else (other bit widths, GEMV / Marlin / exllama layouts, unknown methods) is refused in one line
naming the file, key and value. Docs: docs/export.md, "INT4 weights".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from export.checkpoint import CheckpointError, read_json
from trt_plugins.int4.reference import PackedInt4, int4_linear_ref, pack_nibbles, quantize_rtn

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": ("gate_proj", "up_proj", "down_proj")}
KERNEL_GROUPS = (128, 64, 32)  # group sizes the kernel and MatMulNBits see; coarser groups are re-expressed
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # format -> offset added to the stored zero point
CONFIG_FILES = ("quantize_config.json", "quant_config.json")
WEIGHT_FORMATS = ("float", "int4")  # export --weights
# export --int4-activations -> MatMulNBits accuracy_level. ONNX Runtime's contrib-op docs: 0 "unset" (A is neither
# quantized nor downcast), 4 "int8" (A may be quantized to int8 with the same block_size): what llama.cpp's
# Q4_0 x Q8_0 dot product does on CPU.
INT4_ACTIVATIONS = {"float": 0, "int8": 4}


class QuantizedCheckpointError(CheckpointError):
    """A 4-bit checkpoint this kit cannot read; the message names the file, key or tensor."""


@dataclass(frozen=True)
class QuantSpec:
    method: str        # "gptq" or "awq"
    format: str        # "gptq", "gptq_v2" or "awq-gemm"
    group_size: int    # inputs per scale as stored; -1: one per output channel (per-channel)
    desc_act: bool     # GPTQ act-order as configured (the loader follows each layer's g_idx)
    source: str        # the file the settings came from, for messages

    @property
    def zero_offset(self) -> int:
        return GPTQ_FORMATS.get(self.format, 0)


# --- which format ----------------------------------------------------------------------------------
def read_quant_config(model_dir: str | Path) -> QuantSpec | None:
    """The folder's 4-bit settings, or None for a float checkpoint. Refuses what the kit does not read."""
    model_dir = Path(model_dir)
    raw, source = None, None
    config_path = model_dir / "config.json"
    if config_path.exists():
        config = read_json(config_path)
        if isinstance(config, dict) and config.get("quantization_config") is not None:
            raw, source = config["quantization_config"], f"{config_path}: quantization_config"
    for name in CONFIG_FILES if raw is None else ():
        if (model_dir / name).exists():
            raw, source = read_json(model_dir / name), str(model_dir / name)
            break
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise QuantizedCheckpointError(f"{source}: expected an object, got {raw!r}")
    return parse_quant_config(raw, source)


def parse_quant_config(raw: dict, source: str) -> QuantSpec:
    def bad(key, value, why):
        return QuantizedCheckpointError(f"{source}: key '{key}' is {value!r}; {why}")

    method_key = "quant_method" if "quant_method" in raw else "method"
    method = str(raw.get(method_key, "gptq" if source.endswith("quantize_config.json") else "")).lower()
    if method not in ("gptq", "awq"):
        raise bad(method_key, raw.get(method_key), "this kit reads 4-bit 'gptq' and 'awq' checkpoints")
    bits_key = "bits" if "bits" in raw else "w_bit"
    if raw.get(bits_key) != 4:
        raise bad(bits_key, raw.get(bits_key), "only 4-bit weights are supported")
    group_key = "group_size" if "group_size" in raw else "q_group_size"
    group = raw.get(group_key, 128)
    if isinstance(group, bool) or not isinstance(group, int) or not (group == -1 or kernel_group(group)):
        raise bad(group_key, group, "supported: -1 (per channel) or a multiple of 32")
    if method == "gptq":
        fmt_key = "format" if "format" in raw else "checkpoint_format"
        fmt = raw.get(fmt_key, "gptq")
        if fmt not in GPTQ_FORMATS or raw.get("is_marlin_format"):
            key, value = ("is_marlin_format", True) if raw.get("is_marlin_format") else (fmt_key, fmt)
            raise bad(key, value, "supported GPTQ formats: 'gptq' (v1) and 'gptq_v2'; re-save the model in "
                                  "one of them with gptqmodel")
        if raw.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
            raise bad("pack_dtype", raw["pack_dtype"], "GPTQ checkpoints are read with int32 packing only")
        desc_act = raw.get("desc_act", False)
        if not isinstance(desc_act, bool):
            raise bad("desc_act", desc_act, "must be true or false")
        return QuantSpec("gptq", fmt, group, desc_act, source)
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise bad("version", raw.get("version"), "AutoAWQ's 'gemm' layout is supported (not gemv, gemv_fast, "
                                                 "marlin, exllama)")
    if raw.get("zero_point", True) is not True:
        raise bad("zero_point", raw.get("zero_point"), "AutoAWQ GEMM checkpoints carry zero points")
    return QuantSpec("awq", "awq-gemm", group, False, source)


def kernel_group(group: int) -> int:
    """The group size the kit stores for a checkpoint group (equal, or a divisor with scales repeated)."""
    return next((g for g in KERNEL_GROUPS if group > 0 and group % g == 0), 0)


# --- unpacking the published formats ---------------------------------------------------------------
def _nibbles_along_rows(q: torch.Tensor) -> torch.Tensor:
    """int32 (R, C) -> (8R, C): row 8r + j is bits 4j..4j+3 of q[r]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32).view(1, 8, 1)
    return ((q.to(torch.int32).unsqueeze(1) >> shifts) & 15).reshape(-1, q.shape[1])


def _nibbles_along_cols(q: torch.Tensor) -> torch.Tensor:
    """int32 (R, C) -> (R, 8C): column 8c + j is bits 4j..4j+3 of q[:, c]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32).view(1, 1, 8)
    return ((q.to(torch.int32).unsqueeze(-1) >> shifts) & 15).reshape(q.shape[0], -1)


def _check_shape(name: str, t: torch.Tensor, shape: tuple, dtype=None):
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        want = f"{dtype} " if dtype is not None else ""
        raise QuantizedCheckpointError(f"tensor '{name}' is {t.dtype} {tuple(t.shape)}; the format needs "
                                       f"{want}{tuple(shape)}")


def _groups(spec: QuantSpec, K: int, N: int, name: str) -> tuple[int, int]:
    """(inputs per group, groups per row) of a K x N layer, or refuse a layer the group does not fit."""
    group = K if spec.group_size == -1 else spec.group_size
    if K % group or not kernel_group(group) or N % 8:
        raise QuantizedCheckpointError(f"tensor '{name}': in_features {K} / out_features {N} do not fit "
                                       f"group_size {spec.group_size} of {spec.source}")
    return group, K // group


def _to_packed(codes_nk, zeros_ng, scales_ng, group: int, perm, dtype, name: str) -> PackedInt4:
    """The kit's layout from (N, K) codes in stored order, (N, G) zero points and scales per stored group."""
    N, K = codes_nk.shape
    if int(zeros_ng.max()) > 15:
        raise QuantizedCheckpointError(f"tensor '{name}.qzeros' holds zero point {int(zeros_ng.max())} (stored "
                                       f"15 with GPTQ v1's offset of 1), which 4 bits cannot hold; re-save as "
                                       f"gptq_v2")
    kg = kernel_group(group)
    if perm is not None:
        codes_nk = codes_nk.index_select(1, perm)
    repeat = group // kg
    zeros_ng, scales_ng = zeros_ng.repeat_interleave(repeat, 1), scales_ng.repeat_interleave(repeat, 1)
    zeros = None if bool((zeros_ng == 8).all()) else pack_nibbles(zeros_ng)
    return PackedInt4(pack_nibbles(codes_nk), scales_ng.to(dtype).contiguous(), zeros, K, kg, perm)


def gptq_to_packed(tensors: dict, spec: QuantSpec, in_features: int, out_features: int, dtype,
                   name: str) -> PackedInt4:
    """A GPTQ QuantLinear's qweight, qzeros, scales, g_idx -> PackedInt4 (act-order becomes perm)."""
    K, N = in_features, out_features
    group, G = _groups(spec, K, N, name)
    _check_shape(f"{name}.qweight", tensors["qweight"], (K // 8, N), torch.int32)
    _check_shape(f"{name}.qzeros", tensors["qzeros"], (G, N // 8), torch.int32)
    _check_shape(f"{name}.scales", tensors["scales"], (G, N))
    codes = _nibbles_along_rows(tensors["qweight"]).T  # (N, K), input order as stored
    zeros = (_nibbles_along_cols(tensors["qzeros"]) + spec.zero_offset).T  # (N, G)
    perm = None
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        _check_shape(f"{name}.g_idx", g_idx, (K,))
        g_idx = g_idx.to(torch.int64)
        if not bool((g_idx == torch.arange(K) // group).all()):
            counts = torch.bincount(g_idx.clamp(0, G), minlength=G + 1)
            if int(g_idx.min()) < 0 or int(g_idx.max()) >= G or not bool((counts[:G] == group).all()):
                raise QuantizedCheckpointError(f"tensor '{name}.g_idx' does not give every one of the {G} "
                                               f"groups exactly {group} inputs; the kit cannot make them "
                                               f"contiguous")
            perm = torch.argsort(g_idx, stable=True)
    return _to_packed(codes, zeros, tensors["scales"].float().T, group, perm, dtype, name)


def awq_to_packed(tensors: dict, spec: QuantSpec, in_features: int, out_features: int, dtype,
                  name: str) -> PackedInt4:
    """An AutoAWQ WQLinear_GEMM's qweight, qzeros, scales -> PackedInt4."""
    K, N = in_features, out_features
    group, G = _groups(spec, K, N, name)
    _check_shape(f"{name}.qweight", tensors["qweight"], (K, N // 8), torch.int32)
    _check_shape(f"{name}.qzeros", tensors["qzeros"], (G, N // 8), torch.int32)
    _check_shape(f"{name}.scales", tensors["scales"], (G, N))
    column = torch.tensor([8 * c + AWQ_ORDER.index(j) for c in range(N // 8) for j in range(8)])
    codes = _nibbles_along_cols(tensors["qweight"])[:, column].T  # (N, K)
    zeros = _nibbles_along_cols(tensors["qzeros"])[:, column].T  # (N, G)
    return _to_packed(codes, zeros, tensors["scales"].float().T, group, None, dtype, name)


# --- the module ------------------------------------------------------------------------------------
class Int4Linear(torch.nn.Module):
    """y = x @ W^T from 4-bit codes in the kit's layout. Eager: int4_linear_ref. Exported to ONNX: the
    portable flavor writes com.microsoft::MatMulNBits (ONNX Runtime), the trt flavor cpm_edge::CpmInt4Gemm.
    `source` says where the codes came from ("gptq", "gptq_v2", "awq-gemm", "rtn")."""

    def __init__(self, packed: PackedInt4, source: str):
        super().__init__()
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("perm", packed.perm)
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.group_size, self.source = packed.group_size, source
        self.export_flavor, self.accuracy_level = "portable", 0

    def packed(self) -> PackedInt4:
        zeros = self.zeros.view(torch.uint8) if self.zeros is not None else None
        return PackedInt4(self.qweight.view(torch.uint8), self.scales, zeros, self.in_features, self.group_size,
                          self.perm)

    def set_export_flavor(self, flavor: str, activations: str = "float"):
        """trt: hold the codes as int8 (TensorRT widens uint8 initializers to int32; a view cannot be
        exported); portable: uint8, as MatMulNBits takes them, with its accuracy_level for `activations`."""
        dtype = torch.int8 if flavor == "trt" else torch.uint8
        self.qweight = self.qweight.view(dtype)
        if self.zeros is not None:
            self.zeros = self.zeros.view(dtype)
        self.export_flavor, self.accuracy_level = flavor, INT4_ACTIVATIONS[activations]

    def forward(self, x):
        if not torch.onnx.is_in_onnx_export():
            return int4_linear_ref(x, self.packed())
        if self.perm is not None:
            x = x.index_select(-1, self.perm)  # act-order: a Gather, the kernel sees contiguous groups
        if self.export_flavor == "trt":
            return self._plugin(x)
        return matmul_nbits(x, self.qweight, self.scales, self.zeros, self.in_features, self.group_size,
                            self.accuracy_level)

    def _plugin(self, x):
        from trt_plugins import ops

        zeros = self.zeros if self.zeros is not None else torch.empty(0, dtype=torch.int8)
        return ops.cpm_int4_gemm(x, self.qweight, self.scales, zeros, self.in_features, self.group_size)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"source={self.source}, zeros={self.zeros is not None}, act_order={self.perm is not None}")


def matmul_nbits(x, qweight, scales, zeros, in_features: int, group_size: int, accuracy_level: int = 0):
    """ONNX Runtime's com.microsoft::MatMulNBits node (portable flavor): B is qweight viewed as
    (N, K / block, block / 2); packed uint8 zero points, or none for the default 8. accuracy_level 0: A is
    not quantized, so the products are fp32 like the reference's; 4: A rounded to int8 per block (faster on
    CPU, no longer the reference's numbers exactly)."""
    N = qweight.shape[0]
    inputs = [x, qweight.reshape(N, in_features // group_size, group_size // 2), scales]
    if zeros is not None:
        inputs.append(zeros)
    attrs = {"K": in_features, "N": N, "bits": 4, "block_size": group_size,
             "accuracy_level": accuracy_level}
    return torch.onnx.ops.symbolic("com.microsoft::MatMulNBits", inputs, attrs, dtype=x.dtype,
                                   shape=[*x.shape[:-1], N], version=1)


# --- transforms ------------------------------------------------------------------------------------
def projections(model):
    """(hf prefix, parent module, attribute name) of every attention and MLP projection."""
    for i, layer in enumerate(model.layers):
        for block_name, names in PROJECTIONS.items():
            block = getattr(layer, block_name)
            for name in names:
                yield f"model.layers.{i}.{block_name}.{name}", block, name


def quantized_weight_names(files: dict) -> set[str]:
    """HF '<prefix>.weight' names that the checkpoint holds as '<prefix>.qweight' instead."""
    return {n[: -len("qweight")] + "weight" for n in files if n.endswith(".qweight")}


def load_quantized_linears(model, files: dict, spec: QuantSpec, dtype) -> int:
    """Replace every projection the checkpoint stores quantized by an Int4Linear; returns how many.
    files maps tensor names to safetensors paths (export/checkpoint.py weight_files)."""
    from safetensors import safe_open

    convert = gptq_to_packed if spec.method == "gptq" else awq_to_packed
    known = {f"{prefix}.qweight" for prefix, _, _ in projections(model)}
    other = sorted(n for n in files if n.endswith(".qweight") and n not in known)
    if other:
        raise QuantizedCheckpointError(f"tensor '{other[0]}': the kit reads 4-bit attention and MLP projections "
                                       f"only (embeddings and lm_head stay float)")
    count, handles = 0, {}
    try:
        for prefix, parent, name in projections(model):
            if f"{prefix}.qweight" not in files:
                continue
            linear = getattr(parent, name)
            tensors = {}
            for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
                key = f"{prefix}.{part}"
                if key in files:
                    path = files[key]
                    handles.setdefault(path, safe_open(str(path), framework="pt"))
                    tensors[part] = handles[path].get_tensor(key)
            for part in ("qzeros", "scales"):
                if part not in tensors:
                    raise QuantizedCheckpointError(f"tensor '{prefix}.{part}' is missing ({spec.source} says "
                                                   f"{spec.method})")
            if "bias" in tensors and bool(tensors["bias"].any()):
                raise QuantizedCheckpointError(f"tensor '{prefix}.bias' is not zero; MiniCPM has no biases")
            packed = convert(tensors, spec, linear.in_features, linear.out_features, dtype, prefix)
            setattr(parent, name, Int4Linear(packed, spec.format))
            count += 1
    finally:
        handles.clear()
    return count


def quantize_model(model, group_size: int = 128):
    """Round-to-nearest 4-bit (symmetric, llama.cpp Q4_0's rule) of every attention and MLP projection;
    embeddings, norms and the lm_head stay float. Projections already in 4 bits are left as they are."""
    if group_size not in KERNEL_GROUPS:
        raise CheckpointError(f"--group-size {group_size}: supported {', '.join(map(str, sorted(KERNEL_GROUPS)))}")
    for prefix, parent, name in projections(model):
        linear = getattr(parent, name)
        if isinstance(linear, Int4Linear):
            continue
        if linear.in_features % group_size:
            raise CheckpointError(f"{prefix}: in_features {linear.in_features} is not a multiple of --group-size "
                             f"{group_size}")
        dtype = linear.weight.dtype
        packed = quantize_rtn(linear.weight.data, group_size, symmetric=True)
        packed.scales = packed.scales.to(dtype)
        setattr(parent, name, Int4Linear(packed, "rtn"))
    return model


def set_export_flavor(model, flavor: str, activations: str = "float"):
    """Which node the Int4Linear layers write when exported: MatMulNBits (portable, with the accuracy level of
    `activations`) or CpmInt4Gemm (trt)."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.set_export_flavor(flavor, activations)


def weights_info(model) -> dict:
    """export.json's "weights": float, or int4 with where the codes came from and the group size."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return {"format": "float"}
    return {"format": "int4", "bits": 4, "source": sorted({m.source for m in layers}),
            "group_size": sorted({m.group_size for m in layers}), "zero_points": any(m.zeros is not None
                                                                                   for m in layers),
            "act_order": any(m.perm is not None for m in layers), "layers": len(layers),
            "activations": next((name for name, level in INT4_ACTIVATIONS.items()
                                 if {m.accuracy_level for m in layers} == {level}), "mixed")}
