"""`make bench-kernels`: what the two kernels save, counted anywhere, and timed where a GPU is present.

Counts (any machine): for one decode step of MiniCPM4-8B attention (per layer, per kv head group) at 8K,
32K and 128K context, the KV bytes and FLOPs that InfLLM v2 touches versus dense attention. The selection
is *run* (the torch reference on random keys and a random query), and the bytes are counted from the
blocks it picked; stage 1 reads every compressed key once. Ternary: the weight bytes a GEMV reads per
scale layout, against fp16.

Timings (NVIDIA GPU only, triton.testing.do_bench, median over rotating inputs): Triton sparse decode vs
torch SDPA dense at 32K and 128K; ternary GEMV vs fp16 torch.matmul at M=1 for 1024x4096, 4096x4096,
4096x16384, with the bandwidth each reaches against a measured device-to-device copy.

Writes bench/results/kernels.json and bench/results/kernels.png.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trt_plugins.attention.reference import InfLLMv2Config, sparse_block_mask, visible_kernels  # noqa: E402
from trt_plugins.ternary.reference import pack, weight_bytes  # noqa: E402
from export.tiny import fake_quantize_ternary  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CONTEXTS = (8192, 32768, 131072)
HEAD_DIM, GROUP = 128, 16           # MiniCPM4-8B: 32 query heads, 2 kv heads
CACHE_BYTES = 2                     # K/V and compressed keys in bf16, as the engine stores them
GEMV_SHAPES = ((1024, 4096), (4096, 4096), (4096, 16384))  # (N out, K in)


def count_decode_step(context: int, cfg: InfLLMv2Config, seed: int) -> dict:
    """Bytes and FLOPs of one decode token against `context` cached keys, one kv head and its group."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, context, HEAD_DIM, generator=g)
    q = torch.randn(1, GROUP, 1, HEAD_DIM, generator=g)
    pos = torch.tensor([[context - 1]])
    n_kernels = int(visible_kernels(pos, cfg))
    if context < cfg.dense_len:
        keys = context
        stage1_bytes = stage1_flops = 0
    else:
        mask = sparse_block_mask(q, k, pos, cfg)[0, 0, 0]  # (NB,) blocks this token attends
        blocks = torch.nonzero(mask).flatten()
        keys = int(sum(min(cfg.block_size, context - b * cfg.block_size) for b in blocks.tolist()))
        stage1_bytes = n_kernels * HEAD_DIM * CACHE_BYTES
        stage1_flops = 2 * GROUP * n_kernels * HEAD_DIM
    sparse_bytes = stage1_bytes + 2 * keys * HEAD_DIM * CACHE_BYTES
    sparse_flops = stage1_flops + 4 * GROUP * keys * HEAD_DIM
    dense_bytes = 2 * context * HEAD_DIM * CACHE_BYTES
    dense_flops = 4 * GROUP * context * HEAD_DIM
    return {"context": context, "keys_attended": keys, "compressed_keys_read": n_kernels,
            "sparse_kv_bytes": sparse_bytes, "dense_kv_bytes": dense_bytes,
            "sparse_flops": sparse_flops, "dense_flops": dense_flops,
            "bytes_ratio": sparse_bytes / dense_bytes, "flops_ratio": sparse_flops / dense_flops}


def count_ternary() -> list[dict]:
    rows = []
    for layout in ("row", 128, 64, 32):
        for n, kdim in GEMV_SHAPES:
            p = pack(fake_quantize_ternary(torch.randn(n, kdim), layout))
            rows.append({"shape": [n, kdim], "layout": str(layout), "ternary_bytes": weight_bytes(p),
                         "fp16_bytes": n * kdim * 2, "ratio": weight_bytes(p) / (n * kdim * 2)})
    return rows


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

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=int(time.time()) % 10000)
    args = parser.parse_args()
    cfg = InfLLMv2Config()  # the published sparse_config
    report = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
              "seed": args.seed, "sparse_config": vars(cfg), "cache_bytes_per_value": CACHE_BYTES,
              "head_dim": HEAD_DIM, "query_heads_per_kv_head": GROUP}
    report["attention_counts"] = [count_decode_step(c, cfg, args.seed + i) for i, c in enumerate(CONTEXTS)]
    report["ternary_counts"] = count_ternary()
    for c in report["attention_counts"]:
        print(f"decode at {c['context'] // 1024:4d}K: sparse touches {100 * c['bytes_ratio']:5.1f}% of dense KV "
              f"bytes, {100 * c['flops_ratio']:5.1f}% of its FLOPs ({c['keys_attended']} keys + "
              f"{c['compressed_keys_read']} compressed keys)")
    for r in report["ternary_counts"]:
        if r["shape"] == [4096, 4096]:
            print(f"ternary 4096x4096, scales per {r['layout']:>3}: {r['ratio']:.4f} of fp16 bytes "
                  f"(1/{1 / r['ratio']:.1f})")
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
