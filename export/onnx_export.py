"""Export a MiniCPM4 folder to ONNX with its KV cache: the contract between the host and the device.

One graph serves prefill and decode:
  inputs   input_ids (B, T) int64, positions (B, T) int64 (consecutive per row), past_key_i / past_value_i
           (B, Hkv, S, D); sparse trt-flavor graphs also past_ckey_i (B, Hkv, NK, D) fp32, InfLLM v2's
           compressed keys kept between calls
  outputs  logits (B, V) fp32 of the last position (or (B, T, V) with logits="all"),
           present_*: the state with this call's keys written at `positions` (and the kernels they complete).
A runtime binds present_* to the same buffers as past_* so a decode step writes T new positions in place
and never copies the cache (docs/export.md counts the bytes). export.json's "state" lists every such pair
with its per-row shape and dtype: what a backend allocates.

Flavors (the attention of every layer differs, nothing else does):
  portable  com.microsoft GroupQueryAttention, which ONNX Runtime's CPU provider runs in place; InfLLM v2
            selection (sparse models) in standard ONNX ops, given to it as an attention bias.
  trt       cpm_edge::CpmAttention and cpm_edge::CpmTernaryGemm nodes, which TensorRT's ONNX parser maps
            to the kit's plugins (trt_plugins/ops.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from export.checkpoint import DTYPES, AtomicDir, CheckpointError, file_sha256, load_config, load_model
from export.model import MiniCPM
from trt_plugins import ops
from trt_plugins.attention.reference import InfLLMv2Config, dense_rows, selected_blocks

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: export.json lists the carried state (KV caches, compressed keys)
ONNX_OPSET = 18
FLAVORS = ("portable", "trt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
                   "chat_template.jinja")  # MiniCPM5 ships its template as a file
EXTERNAL_DATA_BYTES = 512 * 2**20  # larger graphs keep their weights in model.onnx.data


def sparse_bias(q: torch.Tensor, k: torch.Tensor, past_k: torch.Tensor, positions: torch.Tensor,
                cfg: InfLLMv2Config) -> torch.Tensor:
    """Additive attention bias (B, H, T, S): 0 on the keys InfLLM v2 selects, -inf elsewhere.

    The selection is the reference's, traced into standard ONNX ops. It needs this call's keys, so it sees
    the cache with them written (a copy for the selection only; the runtime's cache is updated in place).
    """
    keys = ops.write_cache(past_k, k, positions)  # (B, Hkv, S, D)
    mask = selected_blocks(q.transpose(1, 2), keys, positions, cfg)  # (B, Hkv, T, NB), cfg.revision's rule
    mask = mask | dense_rows(positions, cfg)[:, None, None, None]
    tokens = mask.repeat_interleave(cfg.block_size, dim=-1)[..., :past_k.shape[2]]  # (B, Hkv, T, S)
    tokens = tokens.repeat_interleave(q.shape[2] // k.shape[2], dim=1)  # (B, H, T, S)
    return torch.where(tokens, 0.0, float("-inf")).to(q.dtype)


def portable_attention(q, k, v, past_k, past_v, positions, sparse: InfLLMv2Config | None):
    """ONNX Runtime's GroupQueryAttention (in place over a shared past/present buffer); eager: the reference."""
    if not torch.onnx.is_in_onnx_export():
        return ops.cpm_attention_eager(q, k, v, past_k, past_v, positions, sparse)
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    seqlens = positions[:, -1].to(torch.int32)  # per row: the last position = total length - 1
    capacity = torch.full((), past_k.shape[2], dtype=torch.int32)  # GQA's total_sequence_length
    bias = sparse_bias(q, k, past_k, positions, sparse) if sparse is not None else None
    out, k_new, v_new = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [q.reshape(B, T, H * D), k.reshape(B, T, Hkv * D), v.reshape(B, T, Hkv * D), past_k, past_v, seqlens,
         capacity, None, None, None, bias],
        {"num_heads": H, "kv_num_heads": Hkv, "scale": 1.0 / math.sqrt(D)},
        dtypes=[q.dtype, past_k.dtype, past_v.dtype],
        shapes=[[B, T, H * D], list(past_k.shape), list(past_v.shape)], version=1)
    return out.reshape(B, T, H, D), k_new, v_new


class ExportModel(torch.nn.Module):
    """MiniCPM with its caches as graph inputs and outputs (the module's own KV cache is not used)."""

    def __init__(self, model: MiniCPM, flavor: str, all_logits: bool = False):
        super().__init__()
        self.model, self.flavor, self.all_logits = model, flavor, all_logits
        self.sparse = model.config.sparse
        self.state_per_layer = 3 if carries_compressed_keys(flavor, self.sparse) else 2
        self._past: tuple = ()
        self._present: list = []
        for i, layer in enumerate(model.layers):
            layer.self_attn.cache_and_attend = self._layer_op(i)

    def _layer_op(self, i: int):
        n = self.state_per_layer

        def op(q, k, v, positions, first_row=0):
            past = self._past[n * i:n * i + n]
            if self.flavor == "portable":
                outs = portable_attention(q, k, v, *past, positions, self.sparse)
            else:
                outs = ops.cpm_attention(q, k, v, past[0], past[1], positions, self.sparse, *past[2:])
            self._present += list(outs[1:])
            return outs[0]
        return op

    def forward(self, input_ids, positions, *past):
        self._past, self._present = past, []
        logits = self.model(input_ids, positions, last_only=not self.all_logits)
        if not self.all_logits:
            logits = logits[:, 0]  # (B, V)
        return (logits, *self._present)


@dataclass
class ExportOptions:
    model_dir: Path
    out: Path
    flavor: str = "portable"
    dtype: str = "fp32"
    max_seq: int = 4096
    ternary: str = "auto"  # auto: pack when every projection is ternary (trt flavor only); off; packed
    all_logits: bool = False
    overwrite: bool = False
    sparse: bool = True    # False: dense attention even when the model has a sparse_config
    weights: str = "float"  # float: as the checkpoint holds them (GPTQ/AWQ stay int4); int4: round-to-nearest
    group_size: int = 128   # inputs per scale for weights="int4"
    int4_activations: str = "float"  # portable int4: "int8" lets MatMulNBits round activations (accuracy_level 4)
    rewrite: bool = True    # portable: the ONNX Runtime fusions of export/onnx_rewrite.py (trt: TensorRT fuses)


def model_hash(model_dir: Path) -> str:
    """sha256 over config.json and the weight files, in name order."""
    h = hashlib.sha256()
    for path in sorted([model_dir / "config.json", *model_dir.glob("*.safetensors")]):
        h.update(path.name.encode())
        file_sha256(path, h)
    return h.hexdigest()


def carries_compressed_keys(flavor: str, sparse: InfLLMv2Config | None) -> bool:
    """trt-flavor sparse layers keep InfLLM v2's compressed keys between calls (the portable graph
    recomputes its selection inside standard ops)."""
    return flavor == "trt" and sparse is not None


def state_specs(config, flavor: str, max_seq: int, dtype: str) -> list[dict]:
    """Every tensor the graph carries between calls, in input order: name pair, per-row shape, dtype."""
    from trt_plugins.plans import n_kernels

    kinds = [("key", max_seq, dtype), ("value", max_seq, dtype)]
    if carries_compressed_keys(flavor, config.sparse):
        kinds.append(("ckey", n_kernels(config.sparse, max_seq), "fp32"))
    return [{"input": f"past_{kind}_{i}", "output": f"present_{kind}_{i}",
             "shape": [config.num_key_value_heads, length, config.head_dim], "dtype": kind_dtype}
            for i in range(config.num_hidden_layers) for kind, length, kind_dtype in kinds]


def io_names(state: list[dict]) -> tuple[list[str], list[str]]:
    return ["input_ids", "positions", *[s["input"] for s in state]], ["logits", *[s["output"] for s in state]]


def export(opts: ExportOptions, progress=lambda stage: None) -> Path:
    """Write an export folder (model.onnx, export.json, tokenizer files); returns its path."""
    if opts.flavor not in FLAVORS:
        raise CheckpointError(f"--flavor: {opts.flavor!r} is not one of {', '.join(FLAVORS)}")
    if opts.dtype not in DTYPES:
        raise CheckpointError(f"--dtype: {opts.dtype!r} is not one of {', '.join(DTYPES)}")
    model_dir = Path(opts.model_dir)
    config = load_config(model_dir)
    for name in ("tokenizer.json",):
        if not (model_dir / name).exists():
            raise CheckpointError(f"{model_dir / name}: file not found (the export carries the tokenizer)")
    if opts.max_seq < 2:
        raise CheckpointError(f"--max-seq: {opts.max_seq} is too small")
    destination = AtomicDir(opts.out, overwrite=opts.overwrite)
    destination.check()  # before minutes of work, not after
    progress("loading weights")
    model = load_model(model_dir, DTYPES[opts.dtype], config=config)
    from export.quantized import (INT4_ACTIVATIONS, WEIGHT_FORMATS, quantize_model, set_export_flavor,
                                  weights_info)
    if opts.weights not in WEIGHT_FORMATS:
        raise CheckpointError(f"--weights: {opts.weights!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    if opts.int4_activations not in INT4_ACTIVATIONS:
        raise CheckpointError(f"--int4-activations: {opts.int4_activations!r} is not one of "
                              f"{', '.join(INT4_ACTIVATIONS)}")
    if opts.int4_activations != "float" and opts.flavor != "portable":
        raise CheckpointError(f"--int4-activations {opts.int4_activations}: for the portable flavor (ONNX Runtime's "
                              f"MatMulNBits); the trt flavor's int4 GEMM takes fp16/bf16 activations")
    int4 = weights_info(model)["format"] == "int4"  # a GPTQ/AWQ checkpoint
    if int4 and opts.ternary == "packed":
        raise CheckpointError("--ternary packed: the projections are int4 (a GPTQ/AWQ checkpoint)")
    packed = False
    if opts.ternary != "off" and opts.flavor == "trt" and not int4:
        from export.transforms import pack_ternary
        from trt_plugins.ternary.reference import NotTernaryError
        try:
            pack_ternary(model)
            packed = True
        except NotTernaryError as e:
            if opts.ternary == "packed":
                raise CheckpointError(f"--ternary packed: {e}") from None
            model = load_model(model_dir, DTYPES[opts.dtype], config=config)  # dense: start again unpacked
    if opts.weights == "int4" and packed:
        progress("the projections are ternary: packed at 2 bits (exact), not quantized to int4")
    elif opts.weights == "int4":
        progress(f"quantizing projections to int4 (round-to-nearest, groups of {opts.group_size})")
        quantize_model(model, opts.group_size)
    if opts.int4_activations != "float" and weights_info(model)["format"] != "int4":
        raise CheckpointError(f"--int4-activations {opts.int4_activations}: the projections are not int4 (use it with "
                              f"--weights int4 or a GPTQ/AWQ checkpoint)")
    set_export_flavor(model, opts.flavor, opts.int4_activations)
    if not opts.sparse:
        config.sparse = model.config.sparse = None
    if opts.flavor == "trt" and config.sparse is not None and config.sparse.revision != 1:
        raise CheckpointError(f"{model_dir / 'config.json'}: sparse_config.revision {config.sparse.revision} (MiniCPM4.1's "
                              f"InfLLM v2) runs in the portable flavor only for now: the Triton kernels and TensorRT "
                              f"plugin implement revision 1 (export with --flavor portable, or with dense attention)")
    model.setup_rope(opts.max_seq)
    wrapper = ExportModel(model, opts.flavor, opts.all_logits).eval()

    c = config
    # Example sizes other than 0 and 1, which torch.export would specialise on.
    state = state_specs(c, opts.flavor, opts.max_seq, opts.dtype)
    past = [torch.zeros((2, *spec["shape"]), dtype=DTYPES[spec["dtype"]]) for spec in state]
    example = (torch.zeros(2, 3, dtype=torch.int64), torch.arange(3).expand(2, -1).contiguous(), *past)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=opts.max_seq)
    capacity = torch.export.Dim("capacity", min=2, max=opts.max_seq)
    # The compressed keys' length follows from the capacity; it is fixed here (the engine's capacity).
    dims = {"key": {0: batch, 2: capacity}, "value": {0: batch, 2: capacity}, "ckey": {0: batch}}
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq},
               tuple(dims[spec["input"].split("_")[1]] for spec in state))  # *past is one tuple
    inputs, outputs = io_names(state)

    with destination as tmp:
        progress(f"tracing the {opts.flavor} graph ({c.num_hidden_layers} layers)")
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(wrapper, example, input_names=inputs, output_names=outputs,
                                        dynamic_shapes=dynamic, dynamo=True, opset_version=ONNX_OPSET,
                                        optimize=True, verbose=False)
        weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        external = weight_bytes > EXTERNAL_DATA_BYTES
        progress(f"writing model.onnx ({weight_bytes / 2**20:.0f} MiB of weights"
                 f"{', as external data' if external else ''})")
        program.save(str(tmp / "model.onnx"), external_data=external)
        progress("checking the graph (onnx.checker)")
        import onnx
        onnx.checker.check_model(str(tmp / "model.onnx"), full_check=False)
        graph = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
        opsets = {o.domain or "ai.onnx": o.version for o in graph.opset_import}
        for name in TOKENIZER_FILES:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, tmp / name)
        progress("hashing the checkpoint")
        info = {
            "format_version": FORMAT_VERSION,
            "source": str(model_dir.resolve()),
            "model_hash": model_hash(model_dir),
            "flavor": opts.flavor,
            "dtype": opts.dtype,
            "max_seq": opts.max_seq,
            "logits": "all" if opts.all_logits else "last",
            "ternary_packed": packed,
            "weights": weights_info(model),
            "sparse_config": vars(c.sparse) if c.sparse else None,
            "num_layers": c.num_hidden_layers,
            "num_kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "cache_layout": "B, num_kv_heads, S, head_dim",
            "state": state,
            "inputs": inputs,
            "outputs": outputs,
            "opsets": opsets,
            "plugins": ({"namespace": ops.NAMESPACE, "version": ops.PLUGIN_VERSION,
                         "ops": [ops.ATTENTION_OP] + ([ops.TERNARY_OP] if packed else [])
                                + ([ops.INT4_OP] if int4 else [])}
                        if opts.flavor == "trt" else None),
            "export_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        if opts.rewrite and opts.flavor == "portable":
            from export.onnx_rewrite import rewrite_export
            progress("rewriting the graph for ONNX Runtime (fused norms, packed qkv and gate/up, rotary in GQA)")
            summary = rewrite_export(tmp)  # inside the temporary folder: the export appears rewritten or not at all
            progress(f"rewrite: {summary['nodes_before']} -> {summary['nodes_after']} nodes")
    return Path(opts.out)


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx's exporter warns about things that do not concern this graph (torchvision missing,
    attributes of the wrapper, renamed axes); keep its output to errors."""
    loggers = [logging.getLogger(n) for n in ("", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def print_progress(stage: str):
    print(f"export: {stage}", file=sys.stderr, flush=True)
