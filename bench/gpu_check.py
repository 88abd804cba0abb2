"""`make gpu-check`: what only an NVIDIA GPU can show, in one run of at most 8 minutes.

  triton  the Triton kernels JIT-compiled on the GPU against the torch references, bf16 and fp16 (the
          tensor-core path Triton's interpreter cannot check): every kernel, and the plugins' whole plans
  aot     the ahead-of-time cubins (`cpm-edge kernels compile`, passed as --kernels) launched by the GPU plan
          executor (trt_plugins/cuda_launch.py) with the same plans, against the same references
  timing  a large device-to-device copy (the measured bandwidth), InfLLM v2 decode (MiniCPM4-8B, T=1) at
          32K and 128K against torch SDPA on the same cache, ternary GEMV against fp16 torch.matmul; each
          with the bytes it must read and the share of the measured bandwidth that makes

Each check is independent (a failure is recorded, the rest run); a time guard stops starting checks after
--budget-s and interrupts the one running shortly after. The results file is rewritten (temp, then rename)
after every check, so a killed run still leaves what it measured: <out>/gpu-<gpu name>.json (+ .png when
matplotlib is importable). --dry-run takes the same code path on CPU with tiny sizes and Triton's
interpreter, so CI proves the script runs. Imports only torch, triton, numpy, cuda.bindings and this repo.
Exit: 0 when no check failed, 1 when one failed or raised, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # gpu_check_cases, _timings beside this file (after the
# packages: bench/agent.py must not hide the agent package)
from gpu_check_cases import (  # noqa: E402
    ATOL_ATTENTION, ATOL_KC, ATOL_STAGE1, COS_MIN, DRY_SIZES, GPU_SIZES, NEAR_TIE_REL, REL_TERNARY, Context,
    Unavailable, aot_executor, check_aot_preflight, check_attention_plan, check_block_list_attention,
    check_compress_keys, check_dense_attention, check_infllm, check_select, check_stage1, check_ternary_linear,
    check_ternary_plan, run_triton, check_int4_linear, check_int4_plan)
from gpu_check_timings import check_bandwidth, check_gemv, check_sparse_decode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DRY_RUN_OUT = ROOT / "build" / "gpu-check"
BUDGET_S = 420       # stop starting checks after 7 minutes: the slowest check (128K decode) fits in the 8th
BUDGET_MAX_S = 480
GRACE_S = 40         # then the time guard interrupts the check still running
GROUPS = ("triton", "aot", "timing")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--kernels", type=Path, help="AOT kernel folder for this GPU, e.g. build/gpu-check/kernels/sm_90 "
                   "(cpm-edge kernels compile --target sm_90 --out DIR makes DIR/sm_90)")
    p.add_argument("--out", type=Path, help=f"results folder (default {RESULTS.relative_to(ROOT)}; "
                   f"--dry-run: {DRY_RUN_OUT.relative_to(ROOT)})")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"start no check after this many seconds "
                   f"(default {BUDGET_S}, at most {BUDGET_MAX_S})")
    p.add_argument("--only", default="", help=f"comma-separated groups ({', '.join(GROUPS)}) or check names")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: the same checks on tiny sizes in Triton's interpreter (no GPU, no timings worth quoting)")
    args = p.parse_args(argv)
    if not 0 < args.budget_s <= BUDGET_MAX_S:
        p.error(f"--budget-s {args.budget_s:g}: give 0 < seconds <= {BUDGET_MAX_S}")
    if args.kernels is not None and not sorted(args.kernels.glob("*.cubin")):
        p.error(f"--kernels {args.kernels}: no *.cubin there; make one with "
                "`cpm-edge kernels compile --target sm_90 --out DIR` and pass DIR/sm_90")
    if os.environ.get("TRITON_INTERPRET") == "1" and not args.dry_run:
        p.error("TRITON_INTERPRET=1 is set: unset it to check the compiled kernels, or pass --dry-run")
    args.out = args.out or (DRY_RUN_OUT if args.dry_run else RESULTS)
    return args


def result_name(device_name: str, dry_run: bool) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"
    return "gpu-dry-run-cpu" if dry_run else f"gpu-{slug}"


def write_json_atomic(path: Path, data: dict):
    """Write beside the target, then rename: a reader never sees half a file, a crash leaves the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the run: independent checks, a time guard, results after every check --------------------------------
class TimeGuard(BaseException):
    """Raised inside the running check once the budget and its grace are spent."""


@dataclass
class Check:
    name: str
    group: str
    fn: object  # () -> dict with "pass"; or raises Unavailable


@dataclass
class Runner:
    path: Path
    report: dict
    budget_s: float
    start: float = field(default_factory=time.monotonic)
    running: bool = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def run(self, check: Check):
        entry = {"name": check.name, "group": check.group}
        t0 = time.monotonic()
        if self.elapsed() > self.budget_s:
            entry.update(status="skipped", reason=f"time budget of {self.budget_s:g} s spent before this check")
        else:
            try:
                self.running = True
                detail = check.fn()
                self.running = False
                entry.update(status="pass" if detail.pop("pass") else "fail", detail=detail)
            except Unavailable as e:
                entry.update(status="unavailable", reason=str(e))
            except TimeGuard:
                entry.update(status="error", error=f"stopped by the time guard after {self.elapsed():.0f} s")
            except Exception as e:  # one broken check must not stop the others: recorded with its traceback
                entry.update(status="error", error=f"{type(e).__name__}: {e}",
                             traceback=traceback.format_exc(limit=6).splitlines()[-8:])
            finally:
                self.running = False
                try:
                    free_memory()
                except Exception as e:  # a sticky CUDA error: every later check will say so too
                    entry["after"] = f"synchronize failed: {type(e).__name__}: {e}"
        entry["seconds"] = round(time.monotonic() - t0, 3)
        self.report["checks"].append(entry)
        self.save()
        print(f"[{self.elapsed():6.1f} s] {entry['status']:11s} {check.name}"
              f"{'  ' + (entry.get('error') or entry.get('reason') or '') if entry['status'] not in ('pass',) else ''}",
              flush=True)
        return entry

    def save(self):
        statuses = [c["status"] for c in self.report["checks"]]
        self.report["summary"] = {s: statuses.count(s) for s in ("pass", "fail", "error", "unavailable", "skipped")}
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        write_json_atomic(self.path, self.report)


def free_memory():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def arm_time_guard(runner: Runner, seconds: float):
    """SIGALRM raises TimeGuard in the check running then (between Python bytecodes, so a kernel finishes
    first); outside a check it does nothing, as the budget already stops the next one from starting."""
    def fire(signum, frame):
        if runner.running:
            raise TimeGuard()

    signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)


# --- environment -----------------------------------------------------------------------------------------
def environment(dry_run: bool) -> dict:
    import importlib.metadata as md

    import numpy
    import torch
    import triton

    def version(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    versions = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "triton": triton.__version__, "numpy": numpy.__version__, "cuda_bindings": version("cuda-bindings")}
    try:
        from cuda.bindings import driver
        err, v = driver.cuDriverGetVersion()
        versions["cuda_driver"] = f"{v // 1000}.{v % 1000 // 10}" if int(err) == 0 else f"error {err}"
    except Exception as e:  # the binding is optional for the Triton checks; say why it is missing
        versions["cuda_driver"] = f"unknown ({type(e).__name__}: {e})"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if dry_run:
        device = {"name": "cpu (Triton interpreter)", "processor": platform.processor() or platform.machine()}
    else:
        props = torch.cuda.get_device_properties(0)
        device = {"name": torch.cuda.get_device_name(0), "capability": f"sm_{props.major}{props.minor}",
                  "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
                  "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)}
    return {"device": device, "versions": versions, "git_commit": commit, "machine": platform.node()}


# --- the list, the plot, main -------------------------------------------------------------------------------
def build_checks(ctx: Context) -> list[Check]:
    """In the order they run: the bandwidth (the timings need it), the Triton kernels, the AOT cubins,
    the timings. Names are `what[model,dtype]`; --only takes a group, a name, or a name before the bracket."""
    sizes, dtypes = ctx.sizes, ("bf16", "fp16")
    first = next(iter(sizes.models))
    checks = [Check("copy_bandwidth", "timing", lambda: check_bandwidth(ctx))]
    for dt in dtypes:
        for name, fn in (("compress_keys", check_compress_keys), ("stage1_scores", check_stage1),
                         ("select_blocks", check_select), ("block_attention_dense", check_dense_attention),
                         ("block_attention_list", check_block_list_attention), ("infllm_v2_attention", check_infllm)):
            checks.append(Check(f"{name}[{first},{dt}]", "triton", lambda fn=fn, dt=dt: fn(ctx, first, dt)))
        checks.append(Check(f"ternary_linear[{dt}]", "triton", lambda dt=dt: check_ternary_linear(ctx, dt)))
        checks.append(Check(f"int4_linear[{dt}]", "triton", lambda dt=dt: check_int4_linear(ctx, dt)))
        for model in sizes.models:
            for mode in ("dense", "sparse"):
                checks.append(Check(f"cpm_attention_plan_{mode}[{model},{dt}]", "triton",
                                    lambda m=model, dt=dt, sp=mode == "sparse":
                                    check_attention_plan(ctx, m, dt, sp, run_triton)))
    checks.append(Check("aot_preflight", "aot", lambda: check_aot_preflight(ctx)))
    for dt in dtypes:
        for model in sizes.models:
            for mode in ("dense", "sparse"):
                checks.append(Check(f"aot_cpm_attention_plan_{mode}[{model},{dt}]", "aot",
                                    lambda m=model, dt=dt, sp=mode == "sparse":
                                    check_attention_plan(ctx, m, dt, sp, aot_executor(ctx))))
        checks.append(Check(f"aot_ternary_plan[{dt}]", "aot", lambda dt=dt: check_ternary_plan(ctx, dt, aot_executor(ctx))))
        checks.append(Check(f"aot_int4_plan[{dt}]", "aot", lambda dt=dt: check_int4_plan(ctx, dt, aot_executor(ctx))))
    for context in sizes.contexts:
        checks.append(Check(f"sparse_decode[{context // 1024}K]" if context >= 1024 else f"sparse_decode[{context}]",
                            "timing", lambda c=context: check_sparse_decode(ctx, c)))
    for n, k in sizes.gemv:
        checks.append(Check(f"ternary_gemv[{n}x{k}]", "timing", lambda n=n, k=k: check_gemv(ctx, n, k)))
    return checks


def select_checks(checks: list[Check], only: str) -> list[Check]:
    """--only: groups, exact names or names before the bracket; an unknown word is an error (ValueError)."""
    if not only:
        return checks
    words = [w.strip() for w in only.split(",") if w.strip()]
    picked = [c for c in checks if any(w in (c.group, c.name, c.name.split("[")[0]) for w in words)]
    unknown = [w for w in words if not any(w in (c.group, c.name, c.name.split("[")[0]) for c in checks)]
    if unknown:
        raise ValueError(f"--only {','.join(unknown)}: no such group or check; groups: {', '.join(GROUPS)}; "
                         f"checks: {', '.join(sorted({c.name.split('[')[0] for c in checks}))}")
    if checks[0] not in picked and any(c.group == "timing" for c in picked):
        picked.insert(0, checks[0])  # the timings' share of bandwidth needs the copy measured first
    return picked


def plot(report: dict, path: Path) -> str:
    """Decode attention and GEMV times (eager and CUDA graph), or a note saying why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"skipped: matplotlib not importable ({type(e).__name__}: {e})"
    done = {c["name"]: c["detail"] for c in report["checks"] if c.get("detail") and "timings" in c["detail"]}
    if not done:
        return "skipped: no timing finished"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, prefix, title in ((axes[0], "sparse_decode", "decode attention, T=1 (bf16)"),
                              (axes[1], "ternary_gemv", "GEMV, M=1 (fp16)")):
        names = [n for n in done if n.startswith(prefix)]
        series = [(op, mode) for op in sorted({op for n in names for op in done[n]["timings"]})
                  for mode in ("eager", "graph") if any(done[n]["timings"][op].get(f"{mode}_ms") for n in names)]
        ax.set_title(title)
        if not series:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            continue
        width = 0.8 / len(series)
        for i, (op, mode) in enumerate(series):
            entries = [done[n]["timings"].get(op, {}) for n in names]
            bars = ax.bar([j + i * width for j in range(len(names))], [e.get(f"{mode}_ms") or 0 for e in entries],
                          width, label=f"{op} ({mode})")
            for bar, e in zip(bars, entries):  # the share of the measured copy bandwidth, on top of each bar
                pct = (e.get(mode) or {}).get("pct_of_copy_bandwidth")
                if pct is not None:
                    ax.annotate(f"{pct:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=6)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [n.split("[")[1].rstrip("]") for n in names])
        ax.set_ylabel("ms per call (median); % of copy bandwidth on top")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['device']['name']}: make gpu-check")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path.name


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the kernels run in its interpreter
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run:  # Triton's JIT cache inside the tree (a device's home may not be writable)
        os.environ.setdefault("TRITON_CACHE_DIR", str(DRY_RUN_OUT / "triton-cache"))
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA GPU here (torch.cuda.is_available() is False); "
              "--dry-run takes the same path on CPU", file=sys.stderr)
        return 2
    ctx = Context(GPU_SIZES if not args.dry_run else DRY_SIZES, args.dry_run,
                  args.kernels.resolve() if args.kernels else None, args.seed)
    try:
        checks = select_checks(build_checks(ctx), args.only)
    except ValueError as e:
        print(f"bench/gpu_check.py: {e}", file=sys.stderr)
        return 2
    env = environment(args.dry_run)
    path = args.out / f"{result_name(env['device']['name'], args.dry_run)}.json"
    report = {"tool": "bench/gpu_check.py", "mode": "dry run (CPU, Triton interpreter)" if args.dry_run else "gpu",
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed,
              "budget_s": args.budget_s, **env, "kernels_dir": str(args.kernels) if args.kernels else None,
              "sparse_config": vars(ctx.cfg), "models": ctx.sizes.models,
              "tolerances": {"attention_atol": ATOL_ATTENTION, "stage1_atol": ATOL_STAGE1, "compressed_keys_atol": ATOL_KC,
                             "ternary_rel": REL_TERNARY, "cosine_min": COS_MIN, "select_blocks": "exact",
                             "near_tie_relative_gap": NEAR_TIE_REL},
              "checks": []}
    runner = Runner(path, report, args.budget_s)
    runner.save()
    print(f"gpu-check on {env['device']['name']}: {len(checks)} checks, budget {args.budget_s:g} s -> {path}", flush=True)
    arm_time_guard(runner, args.budget_s + GRACE_S)
    for check in checks:
        runner.run(check)
    signal.setitimer(signal.ITIMER_REAL, 0)
    report["plot"] = plot(report, path.with_suffix(".png"))
    runner.save()
    s = report["summary"]
    print(f"gpu-check: {s['pass']} passed, {s['fail']} failed, {s['error']} errors, {s['unavailable']} unavailable, "
          f"{s['skipped']} skipped in {report['elapsed_s']} s; plot: {report['plot']}; wrote {path}")
    return 1 if s["fail"] or s["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
