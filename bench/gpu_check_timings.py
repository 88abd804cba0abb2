"""The timings of bench/gpu_check.py (`make gpu-check`): the measured copy bandwidth, InfLLM v2 decode against
torch SDPA, ternary GEMV against fp16 matmul, each with the bytes it must read and the share of the measured
bandwidth that makes. The byte arithmetic is pure (tests/test_gpu_check.py checks it by hand)."""
from __future__ import annotations

import math

from gpu_check_cases import (ATOL_ATTENTION, NEAR_TIE_REL, REL_TERNARY, Context, compare, run_triton,
                             tie_adjusted_reference)


# --- pure arithmetic and results ---------------------------------------------------------------------------
def copy_bandwidth_gbs(nbytes: int, ms: float) -> float:
    """A device-to-device copy of nbytes reads and writes each byte once."""
    return 2 * nbytes / (ms * 1e-3) / 1e9


def achieved(read_bytes: int, ms: float, bandwidth_gbs: float | None) -> dict:
    """GB/s an op reaching `read_bytes` in `ms` makes, and its share of the measured copy bandwidth."""
    gbs = read_bytes / (ms * 1e-3) / 1e9
    return {"gbs": gbs, "pct_of_copy_bandwidth": None if not bandwidth_gbs else 100 * gbs / bandwidth_gbs}


def rotation_sets(read_bytes: int, set_bytes: int, l2_bytes: int, max_total: int = 8 << 30) -> int:
    """Input sets to rotate among so that no timed call finds the last one's reads in L2: together they read
    three L2s, within max_total bytes of memory (at least 2 sets, at most 64)."""
    want = math.ceil(3 * l2_bytes / max(read_bytes, 1)) + 1
    return max(2, min(want, 64, max_total // max(set_bytes, 1)))


def visible_kernels(pos: int, kernel_size: int, kernel_stride: int, n_kernels: int) -> int:
    """Compressed keys a query at `pos` scores (reference.visible_kernels, capped by the state's size)."""
    return max(0, min((pos - kernel_size + 1) // kernel_stride + 1, n_kernels)) if pos >= kernel_size - 1 else 0


def sparse_decode_bytes(block_idx, block_cnt, positions, *, heads: int, kv_heads: int, head_dim: int,
                        elem: int, block_size: int, n_visible: list[int]) -> dict:
    """Bytes one InfLLM v2 decode token per row must read: keys and values of the blocks it attends (those
    up to its position), the fp32 compressed keys it scores, its query. block_idx (B*Hkv, width) and block_cnt
    (B*Hkv,) as the selection left them in the plan's workspace; positions and n_visible per row."""
    keys = 0
    for r, (row, count) in enumerate(zip(block_idx, block_cnt)):
        pos = positions[r // kv_heads]
        keys += sum(max(0, min(block_size, pos + 1 - b * block_size)) for b in row[:count])
    out = {"keys_attended": keys, "kv_bytes": 2 * keys * head_dim * elem,
           "compressed_key_bytes": kv_heads * sum(n_visible) * head_dim * 4,
           "q_bytes": len(positions) * heads * head_dim * elem}
    out["total"] = out["kv_bytes"] + out["compressed_key_bytes"] + out["q_bytes"]
    return out


def dense_decode_bytes(positions, *, heads: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """Dense attention of one token per row: every key and value up to its position, and the query."""
    return sum(2 * kv_heads * (p + 1) * head_dim * elem + heads * head_dim * elem for p in positions)


def plan_input_bytes(plan) -> int:
    """Bytes of a plan's inputs (a GEMV reads each once: x, the 2-bit codes, the scales)."""
    return sum(b.nbytes for b in plan.buffers if b.kind == "input")


# --- timings ---------------------------------------------------------------------------------------------
def check_bandwidth(ctx: Context) -> dict:
    import torch
    n = ctx.sizes.copy_bytes
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    ms = ctx.clock.eager_ms([lambda: dst.copy_(src)], max(ctx.sizes.reps // 2, 3))
    ctx.bandwidth_gbs = copy_bandwidth_gbs(n, ms)
    return {"bytes": n, "ms": ms, "gbs": ctx.bandwidth_gbs, "pass": bool(torch.equal(src, dst))}


def check_sparse_decode(ctx: Context, context: int) -> dict:
    """One decode token (B=1, T=1) of the first model's attention at `context`: the CpmAttention plan by the
    Triton executor, sparse and dense, against torch SDPA on the same cache (GQA; and on a cache expanded to
    every query head, SDPA's fastest kernels). Checked against the eager op before it is timed."""
    import torch
    from trt_plugins import ops, plans
    from trt_plugins.attention import reference as ref, selection
    from trt_plugins.executors import DTYPE_NAMES

    (H, Hkv, D), cfg, S, dtype = next(iter(ctx.sizes.models.values())), ctx.cfg, context, torch.bfloat16
    torch.manual_seed(ctx.seed + context)
    shape = plans.AttentionShape(1, 1, H, Hkv, S, D)
    sparse, dense = (plans.attention_plan(shape, DTYPE_NAMES[dtype], c) for c in (cfg, None))
    NK = sparse.buffer("kc").numel // (Hkv * D)
    estimate = 2 * Hkv * min(S, cfg.max_selected * cfg.block_size) * D * 2 + Hkv * NK * D * 4
    n_sets = rotation_sets(estimate, sparse.buffer("k_cache").nbytes * 2 + sparse.buffer("kc").nbytes, ctx.l2_bytes)
    sets = []
    for _ in range(n_sets):
        t = {"q": torch.randn(1, 1, H * D, device=ctx.device, dtype=dtype),
             "k": torch.randn(1, 1, Hkv * D, device=ctx.device, dtype=dtype),
             "v": torch.randn(1, 1, Hkv * D, device=ctx.device, dtype=dtype),
             "k_cache": torch.randn(1, Hkv, S, D, device=ctx.device, dtype=dtype),
             "v_cache": torch.randn(1, Hkv, S, D, device=ctx.device, dtype=dtype),
             "positions": torch.tensor([[S - 1]], device=ctx.device), "out": torch.empty(1, 1, H * D, device=ctx.device, dtype=dtype)}
        t["kc"] = selection.compress_keys(t["k_cache"], cfg)
        sets.append(t)
    t = sets[0]
    q4 = lambda s: s["q"].view(1, 1, H, D).transpose(1, 2)  # noqa: E731  (B, H, T, D)
    expected = ops.cpm_attention_eager(t["q"].view(1, 1, H, D), t["k"].view(1, 1, Hkv, D), t["v"].view(1, 1, Hkv, D),
                                       t["k_cache"].clone(), t["v_cache"].clone(), t["positions"], cfg, t["kc"].clone())
    bound = run_triton(sparse, t)
    want, ties = tie_adjusted_reference(q4(t), expected[1], expected[2], t["positions"], cfg, expected[0].transpose(1, 2))
    correct = compare(t["out"], want.transpose(1, 2).reshape(1, 1, H * D), ATOL_ATTENTION["bf16"])
    correct.update(selection=ties, **{"pass": correct["pass"] and ties["max_relative_gap"] <= NEAR_TIE_REL})
    pos = [S - 1]
    n_vis = [visible_kernels(S - 1, cfg.kernel_size, cfg.kernel_stride, NK)]
    width = sparse.buffer("block_idx").numel // Hkv
    read = sparse_decode_bytes(bound["block_idx"].view(Hkv, width).tolist(), bound["block_cnt"].view(Hkv).tolist(), pos,
                               heads=H, kv_heads=Hkv, head_dim=D, elem=2, block_size=cfg.block_size, n_visible=n_vis)
    dense_read = dense_decode_bytes(pos, heads=H, kv_heads=Hkv, head_dim=D, elem=2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sdpa_check = compare(sdpa(q4(t), expected[1], expected[2], enable_gqa=True),
                         ref.attention_ref(q4(t), expected[1], expected[2], t["positions"]), ATOL_ATTENTION["bf16"])
    reps, clock = ctx.sizes.reps, ctx.clock
    timings = {"triton_sparse": clock.both([lambda s=s: run_triton(sparse, s) for s in sets], reps),
               "triton_dense": clock.both([lambda s=s: run_triton(dense, s) for s in sets], reps),
               "sdpa_gqa": clock.both([lambda s=s: sdpa(q4(s), s["k_cache"], s["v_cache"], enable_gqa=True)
                                       for s in sets], reps)}
    timings["triton_sparse"]["read"] = read["total"]
    timings["triton_dense"]["read"] = timings["sdpa_gqa"]["read"] = dense_read
    del sets[1:]
    expanded_bytes = 2 * H * S * D * 2  # one set: it reads many times L2 per call
    wide = [c.repeat_interleave(H // Hkv, dim=1) for c in (t["k_cache"], t["v_cache"])]
    timings["sdpa_expanded"] = clock.both([lambda: sdpa(q4(t), *wide)], reps)
    timings["sdpa_expanded"]["read"] = expanded_bytes
    for entry in timings.values():
        for mode in ("eager", "graph"):
            if entry.get(f"{mode}_ms"):
                entry[mode] = achieved(entry["read"], entry[f"{mode}_ms"], ctx.bandwidth_gbs)
    return {"context": S, "rotated_sets": n_sets, "bytes_read": read, "dense_bytes_read": dense_read,
            "timings": timings, "speedup_vs_sdpa": speedups(timings, "triton_sparse", ("sdpa_gqa", "sdpa_expanded")),
            "correct": correct, "sdpa_equals_dense_reference": sdpa_check, "pass": correct["pass"]}


def speedups(timings: dict, ours: str, peers: tuple) -> dict:
    """Best peer time over ours, per timing mode (eager, graph), where both were measured."""
    out = {}
    for mode in ("eager_ms", "graph_ms"):
        peer = [timings[p][mode] for p in peers if timings[p].get(mode)]
        if peer and timings[ours].get(mode):
            out[mode.replace("_ms", "")] = min(peer) / timings[ours][mode]
    return out


def check_gemv(ctx: Context, n: int, k: int) -> dict:
    """Ternary GEMV (M=1, fp16, one scale per row: the CpmTernaryGemm plan by the Triton executor) against
    fp16 torch.matmul, each rotating among enough weights to miss L2. Any byte is a valid code row (2-bit
    code 3 reads as 0, as in reference.unpack), so the weights are random bytes; checked before timing."""
    import torch
    from trt_plugins import plans
    from trt_plugins.ternary.reference import PackedTernary, TernaryLayout, ternary_linear_ref

    torch.manual_seed(ctx.seed + n + k)
    cols = -(-k // 128) * 32
    plan = plans.ternary_plan(1, n, k, cols, 1, 0, "fp16")
    read = plan_input_bytes(plan)
    x = torch.randn(1, k, device=ctx.device, dtype=torch.float16)
    sets = [{"x": x, "packed": torch.randint(0, 256, (n, cols), dtype=torch.uint8, device=ctx.device),
             "scales": torch.rand(n, 1, device=ctx.device) + 0.05, "y": torch.empty(1, n, device=ctx.device, dtype=x.dtype)}
            for _ in range(rotation_sets(read, read, ctx.l2_bytes))]
    t = sets[0]
    run_triton(plan, t)
    p = PackedTernary(t["packed"].cpu(), t["scales"].cpu(), k, TernaryLayout("row", k))
    correct = compare(t["y"], ternary_linear_ref(x.cpu(), p), REL_TERNARY["fp16"], relative=True)
    fp16_read = n * k * 2 + k * 2
    weights = [torch.randn(n, k, device=ctx.device, dtype=torch.float16)
               for _ in range(rotation_sets(fp16_read, fp16_read, ctx.l2_bytes))]
    timings = {"ternary": ctx.clock.both([lambda s=s: run_triton(plan, s) for s in sets], ctx.sizes.reps),
               "fp16_matmul": ctx.clock.both([lambda w=w: x @ w.T for w in weights], ctx.sizes.reps)}
    timings["ternary"]["read"], timings["fp16_matmul"]["read"] = read, fp16_read
    for entry in timings.values():
        for mode in ("eager", "graph"):
            if entry.get(f"{mode}_ms"):
                entry[mode] = achieved(entry["read"], entry[f"{mode}_ms"], ctx.bandwidth_gbs)
    return {"shape": [n, k], "rotated_sets": len(sets), "timings": timings,
            "speedup_vs_fp16": speedups(timings, "ternary", ("fp16_matmul",)), "correct": correct,
            "pass": correct["pass"]}
