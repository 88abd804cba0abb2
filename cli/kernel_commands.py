"""`cpm-edge kernels compile`: every kernel configuration, compiled ahead of time for NVIDIA targets."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from agent.errors import AgentInputError


def kernels_arguments(p: argparse.ArgumentParser):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sub.add_parser("compile", help="compile PTX + cubin for targets, with a register/spill report",
                       description="Compile every kernel configuration the engines use for each target, "
                                   "without a GPU, into OUT/<target>/ with OUT/report.json.")
    c.add_argument("--target", default="sm_87,sm_89,sm_90",
                   help="comma-separated SMs (default sm_87,sm_89,sm_90: Orin, RTX 40, Hopper)")
    c.add_argument("--out", default="build/kernels", help="output folder (default build/kernels; replaced)")
    c.add_argument("--model", action="append", default=[], metavar="MODEL_DIR",
                   help="also compile the attention shapes of this MiniCPM4 folder (repeatable)")


def kernels(args) -> int:
    from export.checkpoint import AtomicDir, load_config
    from trt_plugins import aot

    try:
        targets = aot.parse_targets(args.target)
    except ValueError as e:
        raise AgentInputError(str(e)) from None
    shapes = list(aot.ATTENTION_SHAPES)
    for model_dir in args.model:
        c = load_config(model_dir)
        block = c.sparse.block_size if c.sparse else 64
        shapes.append((str(model_dir), c.head_dim, c.num_attention_heads // c.num_key_value_heads, block))
    out = Path(args.out)
    aot.build_cache_env(out.parent / ".triton-cache")  # a cache shared by every build under out.parent
    configs = aot.engine_configs(list(dict.fromkeys(shapes)))
    start = time.perf_counter()

    def progress(done, total, what):
        print(f"[{done}/{total}] {what}", file=sys.stderr, flush=True)

    with AtomicDir(out, overwrite=True) as tmp:
        report = aot.compile_all(targets, tmp, configs, progress)
    print(f"compiled {len(report.kernels)} kernels for {', '.join(report.targets)} in "
          f"{time.perf_counter() - start:.0f} s: {out}/report.json", file=sys.stderr)
    if report.unaccepted_spills:
        for line in report.unaccepted_spills:
            print(f"cpm-edge kernels: register spills not accepted in {aot.ACCEPTED_SPILLS.name}: {line}",
                  file=sys.stderr)
        return 1
    return 0


COMMANDS = [("kernels", kernels_arguments, kernels, "compile the Triton kernels ahead of time for NVIDIA targets")]
