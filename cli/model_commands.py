"""Subcommands on a Hugging Face model folder: tiny, generate, logits (torch is imported inside run)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from agent.errors import AgentInputError

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _id_list(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


# --- tiny -------------------------------------------------------------------------------------------
def tiny_arguments(p: argparse.ArgumentParser):
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must not exist, or be empty)")
    p.add_argument("--variant", choices=("dense", "sparse", "ternary", "minicpm5"), default="dense",
                   help="dense; sparse (adds a scaled-down InfLLM v2 sparse_config); "
                        "ternary (BitCPM4-style fake-quantized linear weights); "
                        "minicpm5 (a plain-Llama MiniCPM5: byte-level BPE, explicit head_dim)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--shards", type=_positive_int, default=1, help="split the weights into N safetensors files")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")


def tiny(args) -> int:
    from export.tiny import write_tiny

    path = write_tiny(args.out_dir, args.variant, seed=args.seed, shards=args.shards, overwrite=args.force)
    family = "MiniCPM5" if args.variant == "minicpm5" else "MiniCPM4"
    print(f"wrote tiny {args.variant} {family} model to {path}", file=sys.stderr)
    return 0


# --- generate ---------------------------------------------------------------------------------------
def generate_arguments(p: argparse.ArgumentParser):
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="Hugging Face MiniCPM4 folder (torch backend) or export folder (onnxruntime backend)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime"), default="auto",
                   help="auto: onnxruntime for an export folder (it has export.json), else torch")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the ChatML template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-tokens", type=_positive_int, default=128, help="tokens to generate at most (128)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json, else 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: generation_config.json, else 1)")
    p.add_argument("--top-k", type=int, help="sample among the K most likely tokens (default: no cut)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop when this text appears (repeatable)")
    p.add_argument("--plugins", choices=("reference", "interpreter"), default="reference",
                   help="a trt-flavor export in ONNX Runtime: its plugin nodes by the torch references (fast) or "
                        "by the TensorRT plugins' own launch plans, Triton kernels in Triton's interpreter (slow)")
    add_model_options(p)


def generate(args) -> int:
    from agent.generation import SamplingParams, generate as run_generation
    from agent.tokenizer import Tokenizer

    backend_name = args.backend
    if backend_name == "auto":
        backend_name = "onnxruntime" if (Path(args.model_dir) / "export.json").exists() else "torch"
    if backend_name == "torch":
        from export.checkpoint import load_config
        load_config(args.model_dir)  # is it MiniCPM4 at all? (before the tokenizer and the weights)
    tokenizer = Tokenizer(args.model_dir)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tokenizer.encode_chat(messages + [{"role": "user", "content": args.prompt}])
    else:
        ids = tokenizer.encode(args.prompt)
    d = tokenizer.defaults
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature if args.temperature is not None else d.get("temperature", 0.0),
        top_p=args.top_p if args.top_p is not None else d.get("top_p", 1.0),
        top_k=args.top_k if args.top_k is not None else d.get("top_k", 0),
        seed=args.seed, stop=tuple(args.stop))
    params.validate()
    if backend_name == "onnxruntime":
        from agent.backends import open_bundle
        if args.ternary != "off" or args.dtype != "fp32" or args.weights != "float":
            raise AgentInputError("--ternary, --dtype and --weights are fixed when the folder is exported "
                                  "(cpm-edge export)")
        if (Path(args.model_dir) / "export.json").exists() and _export_flavor(args.model_dir) == "trt":
            backend = trt_graph_in_onnxruntime(Path(args.model_dir), args.plugins)
        else:
            backend, _, _ = open_bundle(args.model_dir, max_batch=1)
    else:
        backend = load_torch_backend(args, max_batch=1, max_seq=len(ids) + args.max_tokens)

    def show(_, delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    start = time.perf_counter()
    (result,) = run_generation(backend, tokenizer, [ids], [params], on_text=show)
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{len(ids)} prompt tokens, {len(result.token_ids)} generated, finish: {result.finish_reason}, "
          f"{len(result.token_ids) / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


def _export_flavor(export_dir) -> str:
    from agent.onnxruntime_backend import read_export_info
    return read_export_info(Path(export_dir))["flavor"]


def trt_graph_in_onnxruntime(export_dir: Path, plugins: str, max_batch: int = 1):
    """A trt-flavor export run by ONNX Runtime on CPU, its plugin nodes computed by the torch references or by
    the plugins' launch plans in Triton's interpreter (trt_plugins/onnxruntime_ops.py)."""
    if plugins == "interpreter":
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: triton.jit reads it when decorating
    from agent.onnxruntime_backend import OnnxRuntimeBackend
    from trt_plugins.onnxruntime_ops import graph_for_onnxruntime, session_options

    folder = tempfile.TemporaryDirectory(prefix="cpm-edge-ort-")
    backend = OnnxRuntimeBackend(graph_for_onnxruntime(export_dir, Path(folder.name)), max_batch=max_batch,
                                 session_options=session_options(plugins))
    backend.graph_folder = folder  # removed with the backend
    return backend


def load_torch_backend(args, max_batch: int, max_seq: int):
    """The torch model of a folder behind the backend interface, with the capacity the run needs.

    A sparse_config turns on InfLLM v2; --ternary packed runs BitCPM4 projections from 2-bit codes.
    """
    from export.checkpoint import DTYPES, load_config, load_model
    from export.torch_backend import TorchBackend
    from export.transforms import pack_ternary, use_sparse_attention

    config = load_config(args.model_dir)
    model = load_model(args.model_dir, DTYPES[args.dtype], config=config)
    if config.sparse is not None:
        use_sparse_attention(model)
    if args.ternary == "packed":
        from trt_plugins.ternary.reference import NotTernaryError
        try:
            pack_ternary(model)
        except NotTernaryError as e:
            raise AgentInputError(f"--ternary packed: {e}; this is not a BitCPM4 checkpoint") from None
    if getattr(args, "weights", "float") == "int4":  # GPTQ / AWQ folders are int4 already (load_model)
        from export.quantized import quantize_model
        quantize_model(model, args.group_size)
    return TorchBackend(model, max_batch=max_batch, max_seq=max_seq)


def add_model_options(p: argparse.ArgumentParser):
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--ternary", choices=("off", "packed"), default="off",
                   help="packed: run a BitCPM4 checkpoint's projections from 2-bit packed weights")
    p.add_argument("--weights", choices=("float", "int4"), default="float",
                   help="int4: round-to-nearest 4-bit projections, as `export --weights int4` writes them "
                        "(GPTQ / AWQ folders run in int4 as published either way)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128,
                   help="--weights int4: inputs per scale (default 128)")


# --- logits -----------------------------------------------------------------------------------------
def logits_arguments(p: argparse.ArgumentParser):
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face MiniCPM4 folder")
    p.add_argument("--input-ids", type=_id_list, action="append", required=True, metavar="1,2,3",
                   help="one row of token ids (repeat for a batch; rows must have equal length)")
    p.add_argument("--out", required=True, help="output .npy file: float32 [batch, seq, vocab]")
    add_model_options(p)


def logits(args) -> int:
    import numpy as np

    from export.checkpoint import load_config

    rows = args.input_ids
    if len({len(r) for r in rows}) != 1:
        raise AgentInputError(f"--input-ids: rows have different lengths {[len(r) for r in rows]}; "
                              f"run them separately (no padding is added)")
    out = Path(args.out)
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise AgentInputError(f"--out {out}: folder {out.parent} does not exist or is not writable")
    config = load_config(args.model_dir)
    bad = [i for r in rows for i in r if not 0 <= i < config.vocab_size]
    if bad:
        raise AgentInputError(f"--input-ids: token id {bad[0]} is outside the vocabulary "
                              f"(0..{config.vocab_size - 1}) of {args.model_dir}/config.json")
    backend = load_torch_backend(args, max_batch=len(rows), max_seq=len(rows[0]))
    result = backend.all_logits(np.asarray(rows, dtype=np.int64)).astype(np.float32)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, result)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote logits {list(result.shape)} to {out}", file=sys.stderr)
    return 0


COMMANDS = [
    ("tiny", tiny_arguments, tiny, "write a small random MiniCPM4 folder in Hugging Face format"),
    ("generate", generate_arguments, generate, "stream a generated answer from a model folder"),
    ("logits", logits_arguments, logits, "write fp32 logits of every position to a .npy file"),
]
