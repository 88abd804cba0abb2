"""The correctness checks of bench/gpu_check.py (`make gpu-check`; the timings are in gpu_check_timings.py):
each takes a Context and returns a dict with "pass", or raises Unavailable with the reason it cannot run
here. Also the sizes of both modes and the clock. Imports torch and this repo's trt_plugins inside the
functions, so bench/gpu_check.py can set TRITON_INTERPRET for a dry run before Triton is imported.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

# Tolerances, named with their reason.
ATOL_ATTENTION = {"fp16": 2e-3, "bf16": 1.6e-2}  # as tests/: p is rounded to the value dtype before p @ v
ATOL_STAGE1 = 1e-4    # fp32 dot and online softmax of the same half inputs, summed in another order
ATOL_KC = 1e-5        # fp32 mean of kernel_size half keys, summed in another order
REL_TERNARY = {"fp16": 2e-3, "bf16": 1.6e-2}  # of the largest |y|: both round an fp32 sum to the dtype once
REL_INT4 = REL_TERNARY  # the same: exact small-integer weights times a scale, fp32 sums, one final rounding
COS_MIN = 0.9999
# Stage-1 scores of two blocks this close (relative) may be ranked either way by fp32 rounding (the kernel and
# torch sum in different orders, ~1e-6); a wrong selection picks blocks whose scores differ by far more.
NEAR_TIE_REL = 1e-4


class Unavailable(Exception):
    """A check that cannot run here, with the reason (not a failure of what it checks)."""


# --- sizes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """What one mode runs. The GPU mode uses the released models' attention shapes and the published
    sparse_config; the dry run tiny ones the interpreter gets through in seconds."""
    models: dict          # name -> (heads, kv_heads, head_dim); the first is the one timed
    sparse: dict          # InfLLMv2Config keyword arguments
    capacity: int         # cache positions in the correctness checks (not a multiple of any block)
    tokens: int           # query tokens per row in the kernel checks
    prefill: int          # tokens of the plans' first call (more than trt_plugins.plans.SPARSE_CHUNK on a GPU)
    dense_start: int      # first position of the plans' dense row
    contexts: tuple       # decode timings
    gemv: tuple           # (N out, K in) of the ternary GEMV timings
    ternary_cases: tuple  # (M, N, K, group or 0) of the ternary checks
    int4_cases: tuple     # (M, N, K, group, zero points) of the int4 checks: GEMV (M <= 8) and GEMM tiles
    reps: int
    copy_bytes: int


GPU_SIZES = Sizes(models={"MiniCPM4-8B": (32, 2, 128), "MiniCPM4-0.5B": (16, 2, 64)}, sparse={},
                  capacity=10277, tokens=4, prefill=300, dense_start=1000, contexts=(32768, 131072),
                  gemv=((4096, 4096), (14336, 4096), (4096, 14336)),
                  ternary_cases=((1, 1000, 2000, 0), (37, 1000, 2000, 0), (1, 768, 1920, 128), (5, 768, 1920, 32)),
                  int4_cases=((1, 4096, 4096, 128, False), (5, 1000, 2048, 64, True), (37, 1000, 1920, 32, True)),
                  reps=50, copy_bytes=1 << 30)
DRY_SIZES = Sizes(models={"tiny": (4, 2, 64)},
                  sparse=dict(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=4, dense_len=48),
                  capacity=100, tokens=2, prefill=12, dense_start=10, contexts=(130,),
                  gemv=((96, 256),), ternary_cases=((1, 70, 200, 0), (3, 64, 256, 128)),
                  int4_cases=((1, 70, 256, 128, False), (9, 33, 128, 32, True)), reps=2, copy_bytes=1 << 22)


# --- timing -----------------------------------------------------------------------------------------------
class Clock:
    """Median milliseconds per call: CUDA events on a GPU (eager, and one CUDA graph of every rotated call),
    perf_counter on CPU. Calls rotate among input sets so none finds the previous one's reads in L2."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def eager_ms(self, calls: list, reps: int) -> float:
        import torch

        for c in calls:  # warm-up: JIT compilation, allocator
            c()
        if not self.cuda:
            times = []
            for i in range(reps):
                t0 = time.perf_counter()
                calls[i % len(calls)]()
                times.append((time.perf_counter() - t0) * 1e3)
            return sorted(times)[len(times) // 2]
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            start.record()
            calls[i % len(calls)]()
            end.record()
        torch.cuda.synchronize()
        return sorted(s.elapsed_time(e) for s, e in events)[reps // 2]

    def graph_ms(self, calls: list, reps: int) -> float:
        """One CUDA graph holding one call per input set: what the launches cost without the Python and
        launch overhead of eager calls (TensorRT's AOT plugins and CUDA-graph capture remove it too)."""
        import torch

        if not self.cuda:
            raise Unavailable("CUDA graphs need a GPU")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        graph.replay()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        return sorted(s.elapsed_time(e) for s, e in events)[reps // 2] / len(calls)

    def both(self, calls: list, reps: int) -> dict:
        out = {"eager_ms": self.eager_ms(calls, reps)}
        try:
            out["graph_ms"] = self.graph_ms(calls, max(5, reps // 5))
        except Unavailable as e:
            out["graph_ms"], out["graph_note"] = None, str(e)
        except Exception as e:  # a capture failure is a result about that op, not the end of the check
            out["graph_ms"], out["graph_note"] = None, f"capture failed: {type(e).__name__}: {e}"
        return out


# --- the checks ---------------------------------------------------------------------------------------------
@dataclass
class Context:
    sizes: Sizes
    dry_run: bool
    kernels_dir: Path | None
    seed: int
    bandwidth_gbs: float | None = None
    aot: object = None

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def cfg(self):
        from trt_plugins.attention.config import InfLLMv2Config
        return InfLLMv2Config(**self.sizes.sparse)

    @property
    def clock(self) -> Clock:
        return Clock(cuda=not self.dry_run)

    @property
    def l2_bytes(self) -> int:
        import torch
        if self.dry_run:
            return 0  # the interpreter has no cache to miss: two sets, to take the rotating path
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 64 << 20


def torch_dtype(name: str):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[name]


def compare(got, expected, atol: float, relative: bool = False) -> dict:
    """Max abs error (of the largest |expected| when relative), cosine similarity, finiteness, verdict."""
    import torch

    g, e = got.detach().float().cpu().flatten(), expected.detach().float().cpu().flatten()
    finite = bool(torch.isfinite(g).all())
    err = float((g - e).abs().max()) if g.numel() else 0.0
    if relative:
        err /= max(float(e.abs().max()), 1e-30)
    cos = float(torch.nn.functional.cosine_similarity(g.double(), e.double(), dim=0)) if g.numel() else 1.0
    return {("max_rel_err" if relative else "max_abs_err"): err, "tolerance": atol, "cosine": cos,
            "cos_min": COS_MIN, "finite": finite, "pass": finite and err <= atol and cos >= COS_MIN}


def sorted_positions(gen, rows: int, tokens: int, lo: int, hi: int):
    """(rows, tokens) int64 positions, ascending and distinct per row, in [lo, hi)."""
    import torch
    return torch.stack([torch.sort(torch.randperm(hi - lo, generator=gen)[:tokens] + lo).values for _ in range(rows)])


def lists_to_mask(idx, cnt, n_blocks: int):
    """Block lists (..., width) with counts (...) as the selection kernel writes them -> mask (..., NB)."""
    import torch
    width = idx.shape[-1]
    live = torch.arange(width, device=idx.device) < cnt[..., None]
    mask = torch.zeros(*idx.shape[:-1], n_blocks + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, torch.where(live, idx.long(), n_blocks), True)
    return mask[..., :n_blocks]


def tie_adjusted_reference(q, k, v, positions, cfg, expected):
    """The reference attention `expected` (B, H, T, D), except for tokens whose blocks the Triton selection
    (stage 1 over the cache's compressed keys, then select_blocks) ranks differently from the reference: for
    those, the reference attention over the kernels' own blocks. With random inputs a few of the hundreds of
    rows of a prefill meet near-equal scores; `max_relative_gap` says how near (NEAR_TIE_REL bounds it)."""
    import torch
    from trt_plugins.attention import kernels, reference as ref, selection

    n_blocks = -(-k.shape[2] // cfg.block_size)
    kc = ref.compress_keys(k, cfg)
    idx, cnt = selection.select_blocks(kernels.stage1_scores(q, kc, positions, cfg), positions, cfg, n_blocks)
    got = lists_to_mask(idx, cnt, n_blocks)
    scores = ref.block_scores(ref.stage1_scores(q, kc, positions, cfg), n_blocks, cfg)
    chosen = ref.select_blocks(scores, positions, cfg)
    dense = ref.dense_rows(positions, cfg)
    differ = (got != chosen) & ~dense[:, None, None, None]  # (B, Hkv, T, NB)
    rows = differ.any(-1)
    info = {"rows": int((~dense).sum()) * rows.shape[1] * rows.shape[2], "rows_ranked_differently": int(rows.sum()),
            "max_relative_gap": 0.0}
    if not bool(rows.any()):
        return expected, info
    only_kernel = torch.where(got & differ, scores, float("-inf")).amax(-1)[rows]
    only_ref = torch.where(chosen & differ, scores, float("inf")).amin(-1)[rows]
    info["max_relative_gap"] = float(((only_ref - only_kernel).abs() / scores.amax(-1)[rows].clamp_min(1e-30)).max())
    alt = ref.attention_ref(q, k, v, positions, got | dense[:, None, None, None], cfg.block_size)
    return torch.where(rows.any(1)[:, None, :, None], alt, expected), info


class Inputs:
    """Fresh random inputs for one check, on the check's device (seeded per check, printed in the results)."""

    def __init__(self, ctx: Context, name: str):
        import torch
        self.gen = torch.Generator().manual_seed(ctx.seed + sum(map(ord, name)))
        self.device = ctx.device

    def randn(self, *shape, dtype):
        import torch
        return torch.randn(*shape, generator=self.gen).to(self.device, dtype)


def selection_inputs(ctx: Context, name: str, model: str, dtype: str):
    """q (B, H, T, D), k, v (B, Hkv, S, D) and sparse query positions (every row's last >= dense_len)."""
    H, Hkv, D = ctx.sizes.models[model]
    S, T = ctx.sizes.capacity, ctx.sizes.tokens
    x = Inputs(ctx, name)
    q, k, v = (x.randn(2, h, t, D, dtype=torch_dtype(dtype)) for h, t in ((H, T), (Hkv, S), (Hkv, S)))
    pos = sorted_positions(x.gen, 2, T, ctx.cfg.dense_len, S).to(ctx.device)
    return q, k, v, pos


def check_compress_keys(ctx, model, dtype):
    from trt_plugins.attention import reference as ref, selection
    _, k, _, _ = selection_inputs(ctx, "compress", model, dtype)
    return compare(selection.compress_keys(k, ctx.cfg), ref.compress_keys(k, ctx.cfg), ATOL_KC)


def check_stage1(ctx, model, dtype):
    from trt_plugins.attention import kernels, reference as ref
    q, k, _, pos = selection_inputs(ctx, "stage1", model, dtype)
    kc = ref.compress_keys(k, ctx.cfg)
    return compare(kernels.stage1_scores(q, kc, pos, ctx.cfg), ref.stage1_scores(q, kc, pos, ctx.cfg), ATOL_STAGE1)


def check_select(ctx, model, dtype):
    """The kernel's block lists against the reference's mask, from the same stage-1 scores: exactly equal."""
    from trt_plugins.attention import reference as ref, selection
    q, k, _, pos = selection_inputs(ctx, "select", model, dtype)
    n_blocks = -(-k.shape[2] // ctx.cfg.block_size)
    scores = ref.stage1_scores(q, ref.compress_keys(k, ctx.cfg), pos, ctx.cfg)
    idx, cnt = selection.select_blocks(scores, pos, ctx.cfg, n_blocks)
    got = lists_to_mask(idx, cnt, n_blocks)
    expected = ref.select_blocks(ref.block_scores(scores, n_blocks, ctx.cfg), pos, ctx.cfg)
    differ = int((got != expected).any(-1).sum())
    return {"rows": int(cnt.numel()), "rows_differing": differ, "blocks": n_blocks, "pass": differ == 0}


def check_dense_attention(ctx, model, dtype):
    from trt_plugins.attention import kernels, reference as ref
    q, k, v, _ = selection_inputs(ctx, "dense", model, dtype)
    pos = sorted_positions(Inputs(ctx, "dense-pos").gen, 2, q.shape[2], 0, k.shape[2]).to(ctx.device)
    return compare(kernels.dense_attention(q, k, v, pos), ref.attention_ref(q.float(), k.float(), v.float(), pos),
                   ATOL_ATTENTION[dtype])


def check_block_list_attention(ctx, model, dtype):
    """Attention over the reference selection's blocks (the wrapper hands the kernel their list)."""
    from trt_plugins.attention import kernels, reference as ref
    q, k, v, pos = selection_inputs(ctx, "blocks", model, dtype)
    qf, kf, vf = q.float(), k.float(), v.float()
    mask = ref.sparse_block_mask(qf, kf, pos, ctx.cfg)
    out = compare(kernels.block_attention(q, k, v, pos, ctx.cfg.block_size, block_mask=mask),
                  ref.attention_ref(qf, kf, vf, pos, mask, ctx.cfg.block_size), ATOL_ATTENTION[dtype])
    return {**out, "blocks_attended_mean": float(mask.sum(-1).float().mean())}


def check_infllm(ctx, model, dtype):
    """The whole InfLLM v2 pipeline in Triton kernels, a sparse row and a dense row (below dense_len)."""
    from trt_plugins.attention import kernels, reference as ref
    q, k, v, pos = selection_inputs(ctx, "infllm", model, dtype)
    pos[1] = sorted_positions(Inputs(ctx, "infllm-dense").gen, 1, q.shape[2], 0, ctx.cfg.dense_len - 1)[0].to(pos)
    qf, kf, vf = q.float(), k.float(), v.float()
    expected, ties = tie_adjusted_reference(qf, kf, vf, pos, ctx.cfg, ref.infllm_v2_attention_ref(qf, kf, vf, pos, ctx.cfg))
    out = compare(kernels.infllm_v2_attention(q, k, v, pos, ctx.cfg), expected, ATOL_ATTENTION[dtype])
    return {**out, "selection": ties, "pass": out["pass"] and ties["max_relative_gap"] <= NEAR_TIE_REL}


def check_ternary_linear(ctx, dtype):
    """The wrapper (its plan, run by the Triton executor) for each case, against the reference."""
    from trt_plugins.ternary.kernels import ternary_linear
    results = [ternary_case(ctx, dtype, case, lambda x, p, _plan, _t: ternary_linear(x, p)) for case in ctx.sizes.ternary_cases]
    return {"cases": results, "pass": all(r["pass"] for r in results)}


def ternary_case_plan(case, dtype: str):
    """CpmTernaryGemm's plan for an (M, N, K, group or 0) case: codes (N, K padded to 128 / 4), scales (N, K / group)."""
    from trt_plugins import plans
    M, N, K, group = case
    return plans.ternary_plan(M, N, K, -(-K // 128) * 32, K // group if group else 1, group, dtype)


def ternary_case(ctx, dtype, case, execute):
    """y = x @ W^T for one (M, N, K, group) case; the reference runs on CPU (reference.unpack builds its shift
    table there)."""
    import torch
    from trt_plugins.ternary.reference import PackedTernary, TernaryLayout, pack, ternary_linear_ref
    M, N, K, group = case
    x = Inputs(ctx, f"ternary{case}")
    layout = TernaryLayout("group", group) if group else TernaryLayout("row", K)
    g = group or K
    trits = torch.randint(-1, 2, (N, K), generator=x.gen).float()
    scales = torch.rand(N, K // g, generator=x.gen) + 0.05
    p_cpu = pack(trits * scales.repeat_interleave(g, dim=1), layout)
    p = PackedTernary(p_cpu.packed.to(ctx.device), p_cpu.scales.to(ctx.device), K, layout)
    xs = x.randn(M, K, dtype=torch_dtype(dtype))
    plan = ternary_case_plan(case, dtype)
    tensors = {"x": xs, "packed": p.packed, "scales": p.scales,
               "y": torch.full((M, N), float("nan"), dtype=xs.dtype, device=ctx.device)}
    got = execute(xs, p, plan, tensors)
    return {"case": {"M": M, "N": N, "K": K, "group": group},
            **compare(got, ternary_linear_ref(xs.cpu(), p_cpu), REL_TERNARY[dtype], relative=True)}


def check_int4_linear(ctx, dtype):
    """The W4A16 wrapper (its plan, run by the Triton executor) for each case, against the reference."""
    from trt_plugins.int4.kernels import int4_linear
    results = [int4_case(ctx, dtype, case, lambda x, p, _plan, _t: int4_linear(x, p)) for case in ctx.sizes.int4_cases]
    return {"cases": results, "pass": all(r["pass"] for r in results)}


def int4_case_plan(case, dtype: str):
    from trt_plugins import plans
    M, N, K, group, zeros = case
    return plans.int4_plan(M, N, K, group, zeros, dtype)


def int4_case(ctx, dtype, case, execute):
    """y = x @ W^T for one (M, N, K, group, zeros) case from random codes, zero points and scales."""
    import torch
    from trt_plugins.int4.reference import PackedInt4, int4_linear_ref, pack_nibbles
    M, N, K, group, zeros = case
    x = Inputs(ctx, f"int4{case}")
    zp = pack_nibbles(torch.randint(0, 16, (N, K // group), generator=x.gen)) if zeros else None
    scales = ((torch.rand(N, K // group, generator=x.gen) - 0.3) * 0.05).to(torch_dtype(dtype))
    p_cpu = PackedInt4(pack_nibbles(torch.randint(0, 16, (N, K), generator=x.gen)), scales, zp, K, group)
    p = PackedInt4(p_cpu.qweight.to(ctx.device), scales.to(ctx.device), zp if zp is None else zp.to(ctx.device),
                   K, group)
    xs = x.randn(M, K, dtype=torch_dtype(dtype))
    tensors = {"x": xs, "qweight": p.qweight, "scales": p.scales,
               "y": torch.full((M, N), float("nan"), dtype=xs.dtype, device=ctx.device),
               **({"zeros": p.zeros} if zeros else {})}
    got = execute(xs, p, int4_case_plan(case, dtype), tensors)
    return {"case": {"M": M, "N": N, "K": K, "group": group, "zeros": zeros},
            **compare(got, int4_linear_ref(xs.cpu(), p_cpu), REL_INT4[dtype], relative=True)}


# --- the plugins' plans, by either executor -------------------------------------------------------------
def run_triton(plan, tensors):
    from trt_plugins.executors import run_triton as run
    return run(plan, tensors)


def plan_pointers(plan, tensors) -> tuple[dict, object]:
    """The GPU executor's arguments: device pointers of the plan's buffers by name (checked for dtype and
    size as the Triton executor checks them) and a workspace of plan.workspace_bytes."""
    import torch
    from trt_plugins.executors import bind

    named = {b.name: tensors[b.name] for b in plan.buffers if b.kind != "workspace"}
    bind(plan, named, device=next(iter(named.values())).device)  # raises on a wrong dtype, size or layout
    workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=next(iter(named.values())).device)
    return {name: t.data_ptr() for name, t in named.items()}, workspace


def aot_executor(ctx: Context):
    """CudaKernels over the --kernels folder (trt_plugins/cuda_launch.py), made once per run."""
    if ctx.dry_run:
        raise Unavailable("AOT executor unavailable: a dry run has no GPU to launch cubins on")
    if ctx.kernels_dir is None:
        raise Unavailable("AOT executor unavailable: no --kernels folder given "
                          "(make gpu-check compiles one: cpm-edge kernels compile --target sm_90)")
    if ctx.aot is None:
        import torch
        major, minor = torch.cuda.get_device_capability(0)
        targets = {json.loads(p.read_text()).get("target") for p in ctx.kernels_dir.glob("*.json")}
        if targets != {f"sm_{major}{minor}"}:
            raise Unavailable(f"AOT executor unavailable: {ctx.kernels_dir} holds kernels for {sorted(targets)}, "
                              f"this GPU is sm_{major}{minor}")
        try:
            from trt_plugins.cuda_launch import CudaKernels
        except Exception as e:  # not written yet, or its binding is missing: say so and check the rest
            raise Unavailable(f"AOT executor unavailable: {type(e).__name__}: {e}") from None
        ctx.aot = CudaKernels(ctx.kernels_dir)
    kernels = ctx.aot

    def execute(plan, tensors):
        import torch
        addresses, workspace = plan_pointers(plan, tensors)
        kernels.run(plan, addresses, workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
    return execute


def attention_calls(ctx: Context, sparse: bool) -> list[tuple[int, list[int]]]:
    """(tokens, first position of each of the two rows) of the plan checks' two calls: a prefill whose first
    row crosses dense_len when sparse (ends near the capacity when dense) and whose second stays below it,
    then one decode token per row."""
    S, T = ctx.sizes.capacity, ctx.sizes.prefill
    first = [ctx.cfg.dense_len - T // 2 - 1 if sparse else S - T - 2, ctx.sizes.dense_start]
    return [(T, first), (1, [p + T for p in first])]


def attention_call_plan(ctx: Context, model: str, dtype: str, sparse: bool, tokens: int):
    from trt_plugins import plans
    H, Hkv, D = ctx.sizes.models[model]
    shape = plans.AttentionShape(2, tokens, H, Hkv, ctx.sizes.capacity, D)
    return plans.attention_plan(shape, dtype, ctx.cfg if sparse else None)


def aot_plans(ctx: Context) -> list:
    """Every plan the AOT checks launch, labelled."""
    out = []
    for dtype in ("bf16", "fp16"):
        for model in ctx.sizes.models:
            for sparse in (False, True):
                out += [(f"{model} {dtype} {'sparse' if sparse else 'dense'} T={tokens}",
                         attention_call_plan(ctx, model, dtype, sparse, tokens)) for tokens, _ in attention_calls(ctx, sparse)]
        out += [(f"ternary {dtype} {case}", ternary_case_plan(case, dtype)) for case in ctx.sizes.ternary_cases]
        out += [(f"int4 {dtype} {case}", int4_case_plan(case, dtype)) for case in ctx.sizes.int4_cases]
    return out


def check_aot_preflight(ctx: Context) -> dict:
    """Before any launch, and on CPU too: every launch of the AOT checks' plans has its compiled kernel in
    --kernels, and the GPU executor packs its arguments against that kernel's compiled signature."""
    if ctx.kernels_dir is None:
        raise Unavailable("no --kernels folder given (make gpu-check compiles one: cpm-edge kernels compile --target sm_90)")
    try:
        from trt_plugins.cuda_launch import LaunchError, address_resolver, pack_arguments
    except Exception as e:
        raise Unavailable(f"AOT executor unavailable: {type(e).__name__}: {e}") from None
    missing, mismatched, packed = set(), [], 0
    for label, plan in aot_plans(ctx):
        fake = {b.name: (i + 1) << 32 for i, b in enumerate(plan.buffers) if b.kind != "workspace"}
        resolve = address_resolver(plan, fake, 1 << 40)
        for launch in plan.launches:
            meta = ctx.kernels_dir / f"{launch.config.name}.json"
            if not meta.exists():
                missing.add(launch.config.name)
                continue
            try:
                pack_arguments(launch, json.loads(meta.read_text()), resolve)
                packed += 1
            except LaunchError as e:
                mismatched.append(f"{label}: {e}")
    return {"launches_packed": packed, "missing_kernels": sorted(missing), "mismatched": mismatched,
            "pass": packed > 0 and not missing and not mismatched}


def check_attention_plan(ctx: Context, model: str, dtype: str, sparse: bool, execute) -> dict:
    """CpmAttention's plan, two calls on one state: a prefill of two rows (the first crossing dense_len
    when sparse, the second below it), then one decode token per row with the caches (and compressed
    keys) the first call left. Output, caches and compressed keys against trt_plugins.ops' eager op."""
    import torch
    from trt_plugins import ops
    from trt_plugins.attention import reference as ref

    H, Hkv, D = ctx.sizes.models[model]
    S, cfg = ctx.sizes.capacity, (ctx.cfg if sparse else None)
    x = Inputs(ctx, f"plan{model}{dtype}{sparse}")
    tdt = torch_dtype(dtype)
    calls = attention_calls(ctx, sparse)
    first = calls[0][1]
    state = {"k_cache": x.randn(2, Hkv, S, D, dtype=tdt), "v_cache": x.randn(2, Hkv, S, D, dtype=tdt)}
    if sparse:  # the compressed keys of what the caches held before the first call
        kc = ref.compress_keys(state["k_cache"], cfg)
        done = ref.visible_kernels(torch.tensor(first) - 1, cfg).to(kc.device)
        state["kc"] = kc * (torch.arange(kc.shape[2], device=kc.device)[None, :] < done[:, None])[:, None, :, None]
    expected = {k: v.clone() for k, v in state.items()}
    steps = []
    for tokens, start in calls:
        positions = (torch.tensor(start)[:, None] + torch.arange(tokens)).to(ctx.device)
        q, k, v = (x.randn(2, tokens, h * D, dtype=tdt) for h in (H, Hkv, Hkv))
        plan = attention_call_plan(ctx, model, dtype, sparse, tokens)
        tensors = {"q": q, "k": k, "v": v, "positions": positions, **state,
                   "out": torch.full_like(q, float("nan"))}
        execute(plan, tensors)
        out = ops.cpm_attention_eager(q.view(2, tokens, H, D), k.view(2, tokens, Hkv, D), v.view(2, tokens, Hkv, D),
                                      expected["k_cache"], expected["v_cache"], positions, cfg, expected.get("kc"))
        expected = dict(zip(("k_cache", "v_cache", "kc"), out[1:]))
        want, ties = out[0], None
        if sparse:  # (B, T, H, D) <-> (B, H, T, D)
            want, ties = tie_adjusted_reference(q.view(2, tokens, H, D).transpose(1, 2), expected["k_cache"],
                                                expected["v_cache"], positions, cfg, want.transpose(1, 2))
            want = want.transpose(1, 2)
        step = {"tokens": tokens, "first_positions": start, "launches": len(plan.launches),
                "out": compare(tensors["out"], want.reshape(2, tokens, H * D), ATOL_ATTENTION[dtype]),
                "caches_equal": bool(torch.equal(state["k_cache"], expected["k_cache"])
                                     and torch.equal(state["v_cache"], expected["v_cache"]))}
        if sparse:
            step["kc"] = compare(state["kc"], expected["kc"], ATOL_KC)
            step["selection"] = ties
        step["pass"] = (step["out"]["pass"] and step["caches_equal"] and step.get("kc", {"pass": True})["pass"]
                        and (ties is None or ties["max_relative_gap"] <= NEAR_TIE_REL))
        steps.append(step)
    return {"steps": steps, "pass": all(s["pass"] for s in steps)}


def _gemm_plan_cases(case_fn, cases, ctx: Context, dtype: str, execute) -> dict:
    """A GEMM plugin's plan carried out by `execute` on each case, y against the case's reference."""
    def run(_x, _p, plan, tensors):
        execute(plan, tensors)
        return tensors["y"]
    results = [case_fn(ctx, dtype, case, run) for case in cases]
    return {"cases": results, "pass": all(r["pass"] for r in results)}


def check_ternary_plan(ctx: Context, dtype: str, execute) -> dict:
    return _gemm_plan_cases(ternary_case, ctx.sizes.ternary_cases, ctx, dtype, execute)


def check_int4_plan(ctx: Context, dtype: str, execute) -> dict:
    return _gemm_plan_cases(int4_case, ctx.sizes.int4_cases, ctx, dtype, execute)
