"""`cpm-edge export`: a MiniCPM4 folder to an ONNX export folder (graph with KV cache + export.json)."""
from __future__ import annotations

import argparse
import sys
import time

from cli.model_commands import _positive_int


def export_arguments(p: argparse.ArgumentParser):
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face MiniCPM4 folder")
    p.add_argument("--out", required=True, help="export folder to create (written whole, or not at all)")
    p.add_argument("--flavor", choices=("portable", "trt"), default="portable",
                   help="portable: ONNX Runtime (CPU) ops; trt: the kit's TensorRT plugin nodes (default portable)")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="weights and activations (default: fp32 for portable, fp16 for trt)")
    p.add_argument("--max-seq", type=_positive_int, default=4096,
                   help="context capacity: prompt + answer tokens (default 4096; picks the LongRoPE factors)")
    p.add_argument("--logits", choices=("last", "all"), default="last",
                   help="logits of the last position (generation) or of every position (parity checks)")
    p.add_argument("--ternary", choices=("auto", "off", "packed"), default="auto",
                   help="trt flavor: pack BitCPM4 projections to 2 bits (auto: when every one is ternary)")
    p.add_argument("--weights", choices=("float", "int4"), default="float",
                   help="int4: quantize the attention and MLP projections to 4 bits at export (round-to-nearest, "
                        "symmetric; GPTQ/AWQ checkpoints are int4 as published either way)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=128,
                   help="--weights int4: inputs per scale (default 128)")
    p.add_argument("--int4-activations", choices=("float", "int8"), default="float",
                   help="portable int4: int8 lets ONNX Runtime round activations to 8 bits per block inside "
                        "MatMulNBits (accuracy_level 4, as llama.cpp's Q4_0 does): faster on CPU, logits move by "
                        "about 1e-3 of the largest (tiny models) instead of matching the torch reference (default "
                        "float)")
    p.add_argument("--no-rewrite", dest="rewrite", action="store_false",
                   help="portable: keep the traced graph as it is (default: rewrite it with ONNX Runtime's fused "
                        "ops, export/onnx_rewrite.py)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def export(args) -> int:
    from export.onnx_export import ExportOptions, export as run_export, print_progress

    dtype = args.dtype if args.dtype != "auto" else ("fp32" if args.flavor == "portable" else "fp16")
    start = time.perf_counter()
    out = run_export(ExportOptions(args.model_dir, args.out, args.flavor, dtype, args.max_seq, args.ternary,
                                   all_logits=args.logits == "all", overwrite=args.force, weights=args.weights,
                                   group_size=args.group_size, int4_activations=args.int4_activations,
                                   rewrite=args.rewrite), print_progress)
    print(f"exported {args.flavor} {dtype} graph to {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


COMMANDS = [("export", export_arguments, export, "export a MiniCPM4 folder to ONNX with its KV cache")]
