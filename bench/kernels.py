"""`make bench-kernels`: what the two kernels save, counted anywhere, and timed where a GPU is present.

Counts (any machine): for one decode step of MiniCPM4-8B attention (per layer, per kv head group) at 8K,
32K and 128K context, the bytes read and FLOPs of the CpmAttention plugin's launch plan with InfLLM v2
versus its dense plan. The plan is *executed* (its Triton kernels, in the interpreter without a GPU) on
random keys, and each launch's traffic is counted from its arguments and the blocks the selection picked
(trt_plugins/plan_traffic.py): cache write, incremental key compression, stage 1 (two passes over the
visible compressed keys, fp32), selection, block attention. Ternary: the weight bytes a GEMV reads per
scale layout, against fp16. INT4 (W4A16): the weight bytes of a decode GEMV, from the CpmInt4Gemm plan's
buffers (codes, scales, zero points), for every projection of a MiniCPM4-8B layer and per group size,
against fp16 and the CpmTernaryGemm plan at the same shapes.

Timings (NVIDIA GPU only, triton.testing.do_bench, median over rotating inputs): Triton sparse decode vs
torch SDPA dense at 32K and 128K; ternary GEMV vs fp16 torch.matmul at M=1 for 1024x4096, 4096x4096,
4096x16384, with the bandwidth each reaches against a measured device-to-device copy.

Writes bench/results/kernels.json and bench/results/kernels.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trt_plugins.attention.reference import InfLLMv2Config  # noqa: E402
from trt_plugins.ternary.reference import pack, weight_bytes  # noqa: E402
from export.tiny import fake_quantize_ternary  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CONTEXTS = (8192, 32768, 131072)
HEAD_DIM, GROUP = 128, 16           # MiniCPM4-8B: 32 query heads, 2 kv heads
CACHE_BYTES = 2                     # K/V in fp16/bf16, as the engine stores them (compressed keys: fp32)
GEMV_SHAPES = ((1024, 4096), (4096, 4096), (4096, 16384))  # (N out, K in)
# MiniCPM4-8B projections (N out, K in): hidden 4096, 32 heads / 2 kv heads of 128, intermediate 16384.
LAYER_8B = {"q_proj": (4096, 4096), "k_proj": (256, 4096), "v_proj": (256, 4096), "o_proj": (4096, 4096),
            "gate_proj": (16384, 4096), "up_proj": (16384, 4096), "down_proj": (4096, 16384)}
INT4_LAYOUTS = ((128, False), (128, True), (64, False), (32, False))  # (group size, zero points)


def count_decode_step(context: int, cfg: InfLLMv2Config, seed: int) -> dict:
    """Bytes and FLOPs of one decode token at position context - 1, one kv head and its query group: the
    CpmAttention plugin's plan is executed (Triton kernels; the interpreter on CPU) on random keys with the
    compressed keys of the earlier positions in its state, and every launch's traffic counted from what it
    was given and what the selection chose (trt_plugins/plan_traffic.py). Dense: the dense plan's launches."""
    from trt_plugins import plans
    from trt_plugins.attention.selection import compress_keys
    from trt_plugins.executors import bind, run_launch
    from trt_plugins.plan_traffic import Traffic, launch_traffic

    g = torch.Generator().manual_seed(seed)
    dtype = torch.float16
    shape = plans.AttentionShape(1, 1, GROUP, 1, context, HEAD_DIM)
    k_cache = torch.randn(1, 1, context, HEAD_DIM, generator=g).to(dtype)
    v_cache = torch.randn(1, 1, context, HEAD_DIM, generator=g).to(dtype)
    positions = np.array([[context - 1]], dtype=np.int64)
    kc = torch.zeros(1, 1, plans.n_kernels(cfg, context), HEAD_DIM)
    earlier = compress_keys(k_cache[:, :, :context - 1], cfg)  # the state before this step
    kc[:, :, :earlier.shape[2]] = earlier
    tensors = {"q": torch.randn(1, 1, GROUP * HEAD_DIM, generator=g).to(dtype),
               "k": torch.randn(1, 1, HEAD_DIM, generator=g).to(dtype), "v": torch.randn(1, 1, HEAD_DIM, generator=g).to(dtype),
               "k_cache": k_cache, "v_cache": v_cache, "positions": torch.from_numpy(positions),
               "out": torch.empty(1, 1, GROUP * HEAD_DIM, dtype=dtype), "kc": kc}
    plan = plans.attention_plan(shape, "fp16", cfg)
    bound = bind(plan, tensors)
    sparse, per_kernel = Traffic(), {}
    for launch in plan.launches:
        run_launch(launch, bound)
        counts = bound["block_cnt"].view(1, 1, -1)[..., :1].numpy()
        t = launch_traffic(launch, positions, counts)
        sparse = sparse + t
        name = launch.config.kernel.rsplit("_kernel", 1)[0]
        per_kernel[name] = per_kernel.get(name, 0) + t.read
    dense = Traffic()
    for launch in plans.attention_plan(shape, "fp16", None).launches:
        dense = dense + launch_traffic(launch, positions)
    return {"context": context, "blocks_attended": int(counts.sum()),
            "compressed_keys_visible": (context - cfg.kernel_size) // cfg.kernel_stride + 1,
            "sparse_bytes": sparse.read, "dense_bytes": dense.read, "sparse_flops": sparse.flops,
            "dense_flops": dense.flops, "sparse_bytes_by_kernel": per_kernel,
            "bytes_ratio": sparse.read / dense.read, "flops_ratio": sparse.flops / dense.flops}


def count_ternary() -> list[dict]:
    rows = []
    for layout in ("row", 128, 64, 32):
        for n, kdim in GEMV_SHAPES:
            p = pack(fake_quantize_ternary(torch.randn(n, kdim), layout))
            rows.append({"shape": [n, kdim], "layout": str(layout), "ternary_bytes": weight_bytes(p),
                         "fp16_bytes": n * kdim * 2, "ratio": weight_bytes(p) / (n * kdim * 2)})
    return rows


def plan_weight_bytes(plan) -> int:
    """The bytes of a GEMM plan's weight buffers: every input but the activations."""
    return sum(b.nbytes for b in plan.buffers if b.kind == "input" and b.name != "x")


def count_int4() -> dict:
    """Weight bytes one decode row (M = 1) reads per MiniCPM4-8B layer: the int4 plan's buffers per group
    layout and the ternary plan's (per-row and groups-of-128 fp32 scales), each against fp16."""
    from trt_plugins import plans

    rows = []
    for name, (n, k) in LAYER_8B.items():
        row = {"projection": name, "shape": [n, k], "fp16_bytes": n * k * 2}
        for group, zeros in INT4_LAYOUTS:
            row[f"int4_g{group}{'_zeros' if zeros else ''}_bytes"] = plan_weight_bytes(
                plans.int4_plan(1, n, k, group, zeros, "fp16"))
        for group in (0, 128):
            row[f"ternary_{'row' if group == 0 else f'g{group}'}_bytes"] = plan_weight_bytes(
                plans.ternary_plan(1, n, k, -(-k // 128) * 32, k // group if group else 1, group, "fp16"))
        rows.append(row)
    layer = {key: sum(r[key] for r in rows) for key in rows[0] if key.endswith("_bytes")}
    return {"model": "MiniCPM4-8B", "projections": rows, "layer": layer,
            "layer_ratio_to_fp16": {k: v / layer["fp16_bytes"] for k, v in layer.items() if k != "fp16_bytes"}}


def time_on_gpu(cfg: InfLLMv2Config) -> dict:
    """Median times from triton.testing.do_bench; inputs rotate so no run hits a warm L2 of the last."""
    import triton
    from trt_plugins.attention import kernels as attention
    from trt_plugins.ternary import kernels as ternary

    dev = "cuda"
    out = {"device": torch.cuda.get_device_name(), "attention": [], "ternary": []}
    copy_src = torch.empty(512 * 2**20, dtype=torch.uint8, device=dev)
    copy_dst = torch.empty_like(copy_src)
    ms = triton.testing.do_bench(lambda: copy_dst.copy_(copy_src), warmup=25, rep=200)
    out["copy_bandwidth_gbs"] = 2 * copy_src.numel() / (ms * 1e-3) / 1e9
    for context in (32768, 131072):
        sets = []
        for _ in range(3):  # rotate among 3 caches
            q = torch.randn(1, 2 * GROUP, 1, HEAD_DIM, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, 2, context, HEAD_DIM, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            sets.append((q, k, v))
        pos = torch.tensor([[context - 1]], device=dev)
        it = iter(range(10**9))

        def sparse():
            q, k, v = sets[next(it) % 3]
            return attention.infllm_v2_attention(q, k, v, pos, cfg)

        def dense():
            q, k, v = sets[next(it) % 3]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        t_sparse = triton.testing.do_bench(sparse, warmup=10, rep=100)
        t_dense = triton.testing.do_bench(dense, warmup=10, rep=100)
        out["attention"].append({"context": context, "sparse_ms": t_sparse, "sdpa_dense_ms": t_dense,
                                 "speedup": t_dense / t_sparse})
    for n, kdim in GEMV_SHAPES:
        ws = [torch.randn(n, kdim) for _ in range(3)]
        packed = []
        for w in ws:
            p = pack(fake_quantize_ternary(w, "row"))
            p.packed, p.scales = p.packed.to(dev), p.scales.to(dev)
            packed.append(p)
        halves = [w.to(dev, torch.float16) for w in ws]
        x = torch.randn(1, kdim, device=dev, dtype=torch.float16)
        it = iter(range(10**9))
        t_tern = triton.testing.do_bench(lambda: ternary.ternary_linear(x, packed[next(it) % 3]), warmup=25, rep=200)
        t_fp16 = triton.testing.do_bench(lambda: x @ halves[next(it) % 3].T, warmup=25, rep=200)
        tern_bw = weight_bytes(packed[0]) / (t_tern * 1e-3) / 1e9
        out["ternary"].append({"shape": [n, kdim], "ternary_ms": t_tern, "fp16_ms": t_fp16,
                               "speedup": t_fp16 / t_tern, "ternary_gbs": tern_bw,
                               "fraction_of_copy_bandwidth": tern_bw / out["copy_bandwidth_gbs"]})
    return out


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    ctx = [c["context"] // 1024 for c in report["attention_counts"]]
    axes[0].bar([f"{c}K" for c in ctx], [100 * c["bytes_ratio"] for c in report["attention_counts"]],
                color="#3b7dd8", label="KV bytes")
    axes[0].plot([f"{c}K" for c in ctx], [100 * c["flops_ratio"] for c in report["attention_counts"]], "o-",
                 color="#d8573b", label="FLOPs")
    axes[0].axhline(6, color="gray", ls="--", lw=1, label="goal at 128K: 6%")
    axes[0].set_ylabel("% of dense attention")
    axes[0].set_title("InfLLM v2 decode step, MiniCPM4-8B (counted)")
    axes[0].legend()
    rows = [r for r in report["ternary_counts"] if r["shape"] == [4096, 4096]]
    axes[1].bar([r["layout"] for r in rows], [100 * r["ratio"] for r in rows], color="#4a9d5b")
    axes[1].axhline(100 / 7, color="gray", ls="--", lw=1, label="goal: 1/7 of fp16")
    axes[1].set_xlabel("scale layout (row, or group size)")
    axes[1].set_ylabel("% of fp16 weight bytes")
    axes[1].set_title("Ternary 4096x4096 weight read (counted)")
    axes[1].legend()
    ratios = report["int4_counts"]["layer_ratio_to_fp16"]
    labels = [k.removesuffix("_bytes").replace("_", " ") for k in ratios]
    axes[2].bar(labels, [100 * v for v in ratios.values()],
                color=["#8a5bd8" if k.startswith("int4") else "#4a9d5b" for k in ratios])
    axes[2].set_ylabel("% of fp16 weight bytes")
    axes[2].set_title("MiniCPM4-8B layer, decode weight read (plans' buffers)")
    axes[2].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 10000)
    args = parser.parse_args()
    if not torch.cuda.is_available():  # the plans' kernels run in Triton's interpreter (set before Triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cfg = InfLLMv2Config()  # the published sparse_config
    report = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
              "seed": args.seed, "sparse_config": vars(cfg), "cache_bytes_per_value": CACHE_BYTES,
              "head_dim": HEAD_DIM, "query_heads_per_kv_head": GROUP}
    report["attention_counts"] = [count_decode_step(c, cfg, args.seed + i) for i, c in enumerate(CONTEXTS)]
    report["ternary_counts"] = count_ternary()
    report["int4_counts"] = count_int4()
    for c in report["attention_counts"]:
        parts = ", ".join(f"{k} {v / c['dense_bytes']:.1%}" for k, v in c["sparse_bytes_by_kernel"].items())
        print(f"decode at {c['context'] // 1024:4d}K: the sparse plan reads {100 * c['bytes_ratio']:5.1f}% of the "
              f"dense plan's bytes, {100 * c['flops_ratio']:5.1f}% of its FLOPs ({c['blocks_attended']} blocks; {parts})")
    for r in report["ternary_counts"]:
        if r["shape"] == [4096, 4096]:
            print(f"ternary 4096x4096, scales per {r['layout']:>3}: {r['ratio']:.4f} of fp16 bytes "
                  f"(1/{1 / r['ratio']:.1f})")
    for key, ratio in report["int4_counts"]["layer_ratio_to_fp16"].items():
        print(f"MiniCPM4-8B layer weights, {key.removesuffix('_bytes'):>16}: {ratio:.4f} of fp16 (1/{1 / ratio:.2f})")
    if torch.cuda.is_available():
        report["gpu"] = time_on_gpu(cfg)
        print(json.dumps(report["gpu"], indent=1))
    else:
        report["gpu"] = None
        print("no NVIDIA GPU here: timings skipped (counts only)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernels.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "kernels.png")
    print(f"wrote {RESULTS / 'kernels.json'} and kernels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
