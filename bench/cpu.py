"""`make bench-cpu`: decode tokens/s and peak memory, the kit's onnxruntime backend against llama.cpp.

The same weights for both: a random-weight MiniCPM4-0.5B (24 layers, hidden 1024, 16/2 heads, intermediate
4096, vocab 73448, the published config's scalars and LongRoPE factors), in two precisions:
  fp32  `cpm-edge export --flavor portable --dtype fp32 --max-seq 2304` for ONNX Runtime, an f32 GGUF
        (export/gguf_export.py) for llama.cpp (llama-cpp-python);
  int4  the same export with `--weights int4 --group-size 32 --int4-activations int8` (MatMulNBits,
        accuracy_level 4) and a Q4_0 GGUF (`--dtype q4_0`): both hold the very same 4-bit numbers
        (tests/test_gguf_q4_0.py), embeddings and lm_head fp32 in both, and both round the activations to
        8 bits per block of 32 for the dot products (llama.cpp's Q8_0 on CPU): the same computation;
  int4-fp32act  the same, without --int4-activations: MatMulNBits keeps the activations fp32 (the torch
        reference's numbers), against the same Q4_0 GGUF: what exactness costs.
The ONNX exports are `cpm-edge export`'s default graph, rewritten for ONNX Runtime (export/onnx_rewrite.py).
Same KV cache (fp32: llama.cpp's default f16 cache is switched to f32), same thread count, same capacity
(2304 positions, so both pick the same LongRoPE factors), same work per step: one token in, the last
position's logits out as a numpy array, the next token its argmax.

Per engine, precision and context, a subprocess of its own: load, prefill a random prompt of `context` tokens
(timed, reported), warm up with a few decode steps, then on each request from the parent rewind the cache
to `context` and time `--decode` steps. Its peak memory is the VmHWM it reads from /proc/self/status before
it exits (its own address space's high-water mark; wait4's ru_maxrss would start from the parent's peak).
llama.cpp runs twice, flash attention off and on; the faster is the baseline. The machine may be shared
(other processes compete for its cores), so the engines of one context stay loaded together, their runs are
interleaved in rotating order, each run starts after the machine has been quiet for a second (or after
--quiet-wait), the CPU that other processes used during each run is recorded, and rounds go on until
every engine has --runs clean runs (others used <= --max-others cores; at most 4 x --runs rounds). Decode tokens/s is the median over the
clean runs (over all runs, marked contended, when there are too few).
Before any timing the parent checks that both engines agree on the logits after a 128-token prefill (fp32:
1e-3 of the largest logit; int4: 5e-2, 8-bit activations on one side or both).

Writes bench/results/cpu.json and bench/results/cpu.png; prints the ratios (onnxruntime / llama.cpp) per
precision and context, with the CPU's ISA.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
REFERENCE_CONFIG = Path("/work/shared/reference/configs/MiniCPM4-0.5B.config.json")
CONTEXTS = (128, 2048)
MAX_SEQ = 2304          # capacity of both engines: 2048 prompt + decode steps, a multiple of 256 for llama.cpp
ENGINES = ("onnxruntime", "llama.cpp")
GGML_TYPE_F32 = 0
# precision -> (extra `cpm-edge export` arguments, GGUF --dtype, agreement tolerance of the logits)
PRECISIONS = {"fp32": ([], "f32", 1e-3),
              "int4": (["--weights", "int4", "--group-size", "32", "--int4-activations", "int8"], "q4_0", 5e-2),
              "int4-fp32act": (["--weights", "int4", "--group-size", "32"], "q4_0", 5e-2)}
# MiniCPM4-0.5B, as published (shared/reference/configs): shapes and the three muP scalars.
SHAPE = dict(num_hidden_layers=24, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
             num_key_value_heads=2, vocab_size=73448, max_position_embeddings=32768, scale_emb=12,
             dim_model_base=256, scale_depth=1.4, eos_token_id=[2, 73440], rms_norm_eps=1e-5)
# A 0.5B LongRoPE table in case the reference config is not on this machine (the published factors are used
# when it is; the timing does not depend on their values).
FALLBACK_FACTORS = [1.0 + 48.9 * (i / 31) ** 2 for i in range(32)]


EXPORTER_SOURCES = ("export/onnx_export.py", "export/model.py", "trt_plugins/attention/reference.py",
                    "export/quantized.py", "trt_plugins/int4/reference.py", "export/gguf_export.py",
                    "export/onnx_rewrite.py", "export/onnx_graph.py", "cli/export_commands.py")


# --- preparing the model (parent; imports torch) ---------------------------------------------------------
def prepare(work: Path, precision: str, log) -> tuple[Path, Path]:
    """The ONNX export folder and the GGUF file of one precision (the HF folder first), made once and
    reused while the exporter's code is unchanged."""
    from export.gguf_export import write_gguf
    from export.tiny import write_tiny

    export_args, gguf_dtype, _ = PRECISIONS[precision]
    hf, onnx_dir = work / "minicpm4-0.5b-random", work / f"onnx-portable-{precision}"
    gguf_path = work / f"model-{gguf_dtype}.gguf"
    if not (hf / "config.json").exists():
        overrides = dict(SHAPE)
        if REFERENCE_CONFIG.exists():
            ref = json.loads(REFERENCE_CONFIG.read_text())
            overrides["rope_scaling"] = ref["rope_scaling"]
        else:
            overrides["rope_scaling"] = {"rope_type": "longrope", "long_factor": FALLBACK_FACTORS,
                                         "short_factor": FALLBACK_FACTORS,
                                         "original_max_position_embeddings": 32768}
        log(f"writing a random-weight MiniCPM4-0.5B to {hf}")
        write_tiny(hf, "dense", seed=0, overwrite=True, **overrides)
    # The graph depends on the exporter's code: a cached export made by other code is made again.
    exporter = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in EXPORTER_SOURCES)).hexdigest()
    stamp = work / f"onnx-{precision}-exporter.sha256"
    if not (onnx_dir / "export.json").exists() or not stamp.exists() or stamp.read_text() != exporter:
        log(f"exporting to ONNX (portable, fp32 {' '.join(export_args)}, --max-seq {MAX_SEQ}): a few minutes")
        subprocess.run([str(ROOT / ".venv" / "bin" / "cpm-edge") if (ROOT / ".venv").exists() else "cpm-edge",
                        "export", str(hf), "--out", str(onnx_dir), "--flavor", "portable", "--dtype", "fp32",
                        "--max-seq", str(MAX_SEQ), "--force", *export_args], check=True)
        gguf_path.unlink(missing_ok=True)  # made again below by the same code version
        stamp.write_text(exporter)
    if not gguf_path.exists():
        log(f"writing the {gguf_dtype} GGUF {gguf_path}")
        tmp = gguf_path.with_suffix(".gguf.tmp")
        write_gguf(hf, tmp, gguf_dtype)
        os.replace(tmp, gguf_path)
    return onnx_dir, gguf_path


# --- one engine in a child process (numpy + the engine only: no torch) ------------------------------------
class OrtEngine:
    def __init__(self, export_dir: str, threads: int):
        from agent.onnxruntime_backend import OnnxRuntimeBackend

        self.backend = OnnxRuntimeBackend(export_dir, max_batch=1, max_seq=MAX_SEQ, threads=threads)

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self.backend.prefill(0, np.asarray(ids, dtype=np.int64))

    def rewind(self, n: int):
        pass  # positions >= n are overwritten by the next steps; attention never sees beyond a query's position

    def decode(self, token: int, pos: int) -> np.ndarray:
        return self.backend.decode(np.array([token], dtype=np.int64), np.array([pos], dtype=np.int64))[0]

    @staticmethod
    def version() -> str:
        import onnxruntime
        return onnxruntime.__version__


class LlamaEngine:
    def __init__(self, gguf_path: str, threads: int, flash_attn: bool):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(gguf_path, n_ctx=MAX_SEQ, n_batch=512, n_ubatch=512, n_threads=threads,
                                   n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                                   flash_attn=flash_attn, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _logits(self) -> np.ndarray:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self._logits()

    def rewind(self, n: int):
        self.llm.n_tokens = n  # the next eval removes the cache cells from n on

    def decode(self, token: int, pos: int) -> np.ndarray:
        assert self.llm.n_tokens == pos
        self.llm.eval([token])
        return self._logits()

    @staticmethod
    def version() -> str:
        import llama_cpp
        return llama_cpp.__version__


def child(args):
    """One engine at one context, driven over stdin/stdout by the parent (one JSON line per answer).

    Setup: load, prefill a random prompt of `context` tokens, warm up. Then each "run" line rewinds the cache
    to `context` and times `--decode` steps; "quit" answers with its peak RSS (VmHWM) and ends the process.
    """
    t0 = time.perf_counter()
    if args.engine == "onnxruntime":
        engine = OrtEngine(args.model, args.threads)
    else:
        engine = LlamaEngine(args.model, args.threads, args.flash_attn)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    prompt = [1] + rng.integers(3, 73000, size=args.context - 1).tolist()
    t0 = time.perf_counter()
    first = engine.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    if args.logits_out:
        np.save(args.logits_out, first)

    def run(n: int) -> list[float]:
        engine.rewind(args.context)
        token, times = int(np.argmax(first)), []
        for i in range(n):
            t = time.perf_counter()
            logits = engine.decode(token, args.context + i)
            token = int(np.argmax(logits))
            times.append(time.perf_counter() - t)
        return times

    run(args.warmup)

    def say(obj):
        print(json.dumps(obj), flush=True)

    say({"engine": args.engine, "context": args.context, "version": engine.version(), "load_s": round(load_s, 2),
         "prefill_tokens_per_s": round(args.context / prefill_s, 1)})
    for line in sys.stdin:
        if line.strip() != "run":
            break
        cpu0 = time.process_time()
        times = run(args.decode)
        say({"step_s": times, "cpu_s": time.process_time() - cpu0})
    say({"peak_rss_mb": round(vm_hwm_kib() / 1024, 1)})


def vm_hwm_kib() -> int:
    """This process's resident-set high-water mark (VmHWM, KiB): its own peak, whatever its parent held."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line")


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def wait_for_quiet(max_wait: float, threshold: float = 0.10) -> float:
    """Wait (up to max_wait s) for a second in which other processes use < threshold of the CPUs; return the
    busy fraction of the last second sampled (this bench's children are idle while it waits)."""
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = busy_jiffies()
        time.sleep(1.0)
        b1, t1 = busy_jiffies()
        frac = (b1 - b0) / max(t1 - t0, 1)
        if frac < threshold or time.monotonic() > deadline:
            return frac


class Child:
    """A child process of one engine at one context."""

    def __init__(self, engine: str, model: Path, context: int, args, flash_attn: bool = False,
                 logits_out: Path | None = None, precision: str = "fp32"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--model", str(model),
               "--context", str(context), "--threads", str(args.threads), "--decode", str(args.decode),
               "--warmup", str(args.warmup), "--seed", str(args.seed)]
        if flash_attn:
            cmd.append("--flash-attn")
        if logits_out:
            cmd += ["--logits-out", str(logits_out)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        self.name = f"{precision} {engine}" + (" (flash_attn)" if flash_attn else "")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=ROOT,
                                     text=True)
        self.info = self._read()
        self.runs: list[dict] = []

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.name} failed (exit {self.proc.returncode})")
        return json.loads(line)

    def run(self) -> dict:
        b0, t0 = busy_jiffies()
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = self._read()
        b1, t1 = busy_jiffies()
        ticks = os.sysconf("SC_CLK_TCK")
        wall = sum(r["step_s"])
        # CPU the rest of the machine used meanwhile, in cores (ours: r["cpu_s"]); jiffies are coarse
        r["others_cores"] = round(max((b1 - b0) / ticks - r["cpu_s"], 0.0) / wall, 2)
        self.runs.append(r)
        return r

    def clean_runs(self, max_others: float) -> int:
        return sum(r["others_cores"] <= max_others for r in self.runs)

    def close(self, max_others: float = float("inf"), want: int = 1) -> dict:
        """Stop the child; its results (from the clean runs when there are `want` of them, else from all, marked
        contended) with the peak RSS it read for itself (VmHWM) before exiting."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        peak = self._read()["peak_rss_mb"]
        self.proc.stdout.close()
        if self.proc.wait() != 0:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
        clean = [r for r in self.runs if r["others_cores"] <= max_others]
        used = clean if len(clean) >= want else self.runs
        rates = [len(r["step_s"]) / sum(r["step_s"]) for r in used]
        steps = sorted(t for r in used for t in r["step_s"])
        return {**self.info,
                "decode_tokens_per_s": round(statistics.median(rates), 2),
                "decode_tokens_per_s_runs": [round(x, 2) for x in rates],
                "decode_step_ms": {"median": round(1e3 * statistics.median(steps), 2),
                                   "min": round(1e3 * steps[0], 2), "max": round(1e3 * steps[-1], 2)},
                "contended": used is not clean,
                "all_runs": [{"tokens_per_s": round(len(r["step_s"]) / sum(r["step_s"]), 2),
                              "others_cores": r["others_cores"], "round": r.get("round")} for r in self.runs],
                "peak_rss_mb": peak}


# --- the parent -------------------------------------------------------------------------------------------
def machine(threads: int) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = cpuinfo.splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
    flags = next((l for l in lines if l.startswith("flags")), "").split()
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "isa": isa, "memory_gib": round(mem, 1),
            "os": platform.platform(), "python": platform.python_version(), "threads_used": threads}


def check_agreement(precision: str, onnx_dir: Path, gguf_path: Path, args, work: Path, log) -> dict:
    """Logits after a 128-token prefill from both engines: the same model before any timing."""
    a, b = work / f"ort-{precision}-logits.npy", work / f"llama-{precision}-logits.npy"
    quick = argparse.Namespace(**{**vars(args), "decode": 1, "warmup": 0})
    for engine, model, out in (("onnxruntime", onnx_dir, a), ("llama.cpp", gguf_path, b)):
        child = Child(engine, model, 128, quick, logits_out=out, precision=precision)
        child.run()
        child.close()  # agreement only: no timing kept
    ours, theirs = np.load(a), np.load(b)
    rel = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    tol = PRECISIONS[precision][2]
    res = {"max_relative_error": rel, "tolerance": tol, "same_argmax": bool(ours.argmax() == theirs.argmax()),
           "logit_std": float(ours.std()), "logit_max_abs": float(np.abs(ours).max())}
    log(f"{precision}: agreement after a 128-token prefill: max relative error {rel:.2e} (tolerance {tol:g}), "
        f"same argmax {res['same_argmax']}, logit std {res['logit_std']:.3f}")
    if not np.isfinite(ours).all() or rel > tol:
        raise SystemExit(f"bench-cpu: the {precision} engines disagree ({rel:.2e} > {tol:g}); not timing "
                         f"different models")
    return res


def time_context(context: int, models: dict[str, tuple[Path, Path]], args, log) -> dict[str, dict]:
    """All engines of every precision at one context, alive together, their timed runs interleaved (order
    rotating each round) and each started when the machine is quiet, so that load from other processes falls
    on all alike."""
    children = []
    for precision, (onnx_dir, gguf_path) in models.items():
        for engine, model, fa in (("onnxruntime", onnx_dir, False), ("llama.cpp", gguf_path, False),
                                  ("llama.cpp", gguf_path, True)):
            wait_for_quiet(args.quiet_wait)  # set up one at a time: loads and prefills do not overlap
            children.append(Child(engine, model, context, args, flash_attn=fa, precision=precision))
            log(f"  {children[-1].name}: loaded in {children[-1].info['load_s']} s, prefill "
                f"{children[-1].info['prefill_tokens_per_s']} tokens/s")
    # Rounds of every engine until each has --runs clean runs (other processes used < --max-others cores
    # meanwhile), at most 4 x --runs rounds; each round rotates the order.
    for r in range(4 * args.runs):
        pending = [c for c in children if c.clean_runs(args.max_others) < args.runs]
        if not pending:
            break
        for child in children[r % len(children):] + children[:r % len(children)]:  # all: runs pair by round
            busy = wait_for_quiet(args.quiet_wait)
            res = child.run()
            res["round"] = r
            log(f"  round {r + 1} {child.name}: {len(res['step_s']) / sum(res['step_s']):.2f} tokens/s "
                f"(machine busy {busy:.0%} before, other processes {res['others_cores']} cores during)")
    return {child.name: child.close(args.max_others, args.runs) for child in children}


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.38
    colors = {"onnxruntime": "#1f77b4", "llama.cpp": "#ff7f0e"}
    groups = [(p, c) for p in results["precisions"] for c in results["contexts"]]
    x = np.arange(len(groups))
    for k, engine in enumerate(ENGINES):
        rows = [results["runs"][p][engine][str(c)] for p, c in groups]
        label = {"onnxruntime": "onnxruntime (fp32 / MatMulNBits)", "llama.cpp": "llama.cpp (F32 / Q4_0)"}[engine]
        bars = ax1.bar(x + (k - 0.5) * width, [r["decode_tokens_per_s"] for r in rows], width, label=label,
                       color=colors[engine])
        ax1.bar_label(bars, fmt="%.1f", fontsize=8)
        bars = ax2.bar(x + (k - 0.5) * width, [r["peak_rss_mb"] / 1024 for r in rows], width, label=label,
                       color=colors[engine])
        ax2.bar_label(bars, fmt="%.2f", fontsize=8)
    for ax, title, unit in ((ax1, "decode tokens/s (higher is better)", "tokens/s"),
                            (ax2, "peak RSS of the engine's process (lower is better)", "GiB")):
        ax.set_xticks(x, [f"{p}\n{c} context" for p, c in groups], fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    m = results["machine"]
    fig.suptitle(f"MiniCPM4-0.5B shapes, batch 1, {m['threads_used']} threads — {m['cpu']} "
                 f"({m['logical_cores']} cores, {'/'.join(m['isa'])})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def paired_ratio(ours: dict, theirs: dict, max_others: float) -> float | None:
    """Median over rounds of ours / theirs from runs of the same round, both clean: adjacent in time, so slow
    drifts of the machine (memory bandwidth shared with other tenants) cancel."""
    def by_round(r):
        return {x["round"]: x["tokens_per_s"] for x in r["all_runs"] if x["others_cores"] <= max_others}
    o, t = by_round(ours), by_round(theirs)
    common = sorted(set(o) & set(t))
    return round(statistics.median(o[k] / t[k] for k in common), 3) if common else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--decode", type=int, default=64, help="timed decode steps per run")
    p.add_argument("--runs", type=int, default=5, help="timed runs per engine and context (median)")
    p.add_argument("--warmup", type=int, default=8, help="decode steps before the timed runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each run, wait up to this many seconds for the other processes to go quiet")
    p.add_argument("--max-others", type=float, default=0.1,
                   help="a run is clean when other processes used at most this many cores during it")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "bench-cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    # child mode
    p.add_argument("--child", choices=ENGINES, dest="engine", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, help=argparse.SUPPRESS)
    p.add_argument("--flash-attn", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--logits-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine:
        child(args)
        return 0

    def log(msg):
        print(f"bench-cpu: {msg}", file=sys.stderr, flush=True)

    if max(args.contexts) + args.warmup + args.decode > MAX_SEQ:
        p.error(f"context + warmup + decode must fit the capacity {MAX_SEQ}")
    args.work.mkdir(parents=True, exist_ok=True)
    models = {precision: prepare(args.work, precision, log) for precision in args.precisions}
    agreement = {precision: check_agreement(precision, *models[precision], args, args.work, log)
                 for precision in args.precisions}
    runs: dict = {precision: {e: {} for e in ENGINES} for precision in args.precisions}
    llama_variants: dict = {}
    for context in args.contexts:
        log(f"{context} tokens of context")
        timed = time_context(context, models, args, log)
        for precision in args.precisions:
            runs[precision]["onnxruntime"][str(context)] = timed[f"{precision} onnxruntime"]
            # llama.cpp's baseline is its faster attention path at this precision: flash attention off or on
            off, on = timed[f"{precision} llama.cpp"], timed[f"{precision} llama.cpp (flash_attn)"]
            llama_variants[f"{precision}/{context}/llama.cpp"] = off
            llama_variants[f"{precision}/{context}/llama.cpp (flash_attn)"] = on
            best = max((off, on), key=lambda r: r["decode_tokens_per_s"])
            runs[precision]["llama.cpp"][str(context)] = {**best, "flash_attn": best is on}

    ratios = {precision: {str(c): {
        "decode_tokens_per_s_paired_median": paired_ratio(runs[precision]["onnxruntime"][str(c)],
                                                          runs[precision]["llama.cpp"][str(c)], args.max_others),
        "decode_tokens_per_s": round(runs[precision]["onnxruntime"][str(c)]["decode_tokens_per_s"]
                                     / runs[precision]["llama.cpp"][str(c)]["decode_tokens_per_s"], 3),
        "peak_rss": round(runs[precision]["onnxruntime"][str(c)]["peak_rss_mb"]
                          / runs[precision]["llama.cpp"][str(c)]["peak_rss_mb"], 3)}
        for c in args.contexts} for precision in args.precisions}
    import llama_cpp
    export_info = {precision: json.loads((models[precision][0] / "export.json").read_text())
                   for precision in args.precisions}
    results = {
        "what": "decode tokens/s (median of runs) and peak RSS (VmHWM) per engine process, batch 1, random-weight "
                "MiniCPM4-0.5B shapes, fp32 KV cache; fp32: fp32 weights and activations; int4: the same 4-bit "
                "values in both (MatMulNBits blocks of 32 / Q4_0), activations rounded to int8 per block in both; "
                "int4-fp32act: MatMulNBits with fp32 activations against the same Q4_0; "
                "ratio = onnxruntime / llama.cpp; "
                "all_runs[].others_cores: CPU cores other processes used while that run was timed; the median "
                "is over the clean runs (others_cores <= method.max_others_cores) unless contended is true",
        "machine": machine(args.threads),
        "versions": {"onnxruntime": OrtEngine.version(), "llama_cpp_python": llama_cpp.__version__,
                     "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip()},
        "model": {**{k: v for k, v in SHAPE.items() if k != "eos_token_id"}, "weights": "random (export/tiny.py)",
                  "capacity": MAX_SEQ},
        "exports": {precision: {k: info.get(k) for k in ("weights", "rewrite")}
                    for precision, info in export_info.items()},
        "method": {"decode_steps": args.decode, "runs": args.runs, "max_others_cores": args.max_others,
                   "warmup_steps": args.warmup, "threads": args.threads, "contexts": args.contexts,
                   "precisions": {k: {"export_args": v[0], "gguf_dtype": v[1]} for k, v in PRECISIONS.items()
                                  if k in args.precisions},
                   "llama_cpp": "Llama.eval one token per step, logits copied to numpy, f32 KV cache; the faster "
                                "of flash_attn off/on is the baseline (both in llama_cpp_variants)",
                   "onnxruntime": "OnnxRuntimeBackend.decode (agent/onnxruntime_backend.py), intra_op threads "
                                  "= threads",
                   "peak_rss": "VmHWM of the engine's own process, read by it before exiting"},
        "agreement": agreement,
        "precisions": args.precisions,
        "contexts": args.contexts,
        "runs": runs,
        "llama_cpp_variants": llama_variants,
        "ratios_onnxruntime_over_llama_cpp": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "cpu.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, args.out / "cpu.json")
    plot(results, args.out / "cpu.png")
    isa = "/".join(results["machine"]["isa"])
    for precision in args.precisions:
        for c in args.contexts:
            o, l = runs[precision]["onnxruntime"][str(c)], runs[precision]["llama.cpp"][str(c)]
            r = ratios[precision][str(c)]
            print(f"{precision} context {c:>5}: onnxruntime {o['decode_tokens_per_s']:.2f} tok/s, "
                  f"{o['peak_rss_mb']:.0f} MiB | llama.cpp {l['decode_tokens_per_s']:.2f} tok/s, "
                  f"{l['peak_rss_mb']:.0f} MiB | speed {r['decode_tokens_per_s']:.2f}x (paired by round "
                  f"{r['decode_tokens_per_s_paired_median']}x), memory {r['peak_rss']:.2f}x  [{isa}]")
    print(f"wrote {args.out / 'cpu.json'} and {args.out / 'cpu.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
