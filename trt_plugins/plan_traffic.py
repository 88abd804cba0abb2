"""What each launch of a plan reads, writes and computes: bytes and FLOPs counted from the launch's own grid
and arguments plus the data its kernel branches on (the positions, and the block counts the selection
wrote). One function per kernel, written against that kernel's loads and stores; `make bench-kernels`
executes a plan and sums these, so its figures are what the engine does, not a model of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trt_plugins.plans import DTYPE_BYTES, Launch, Ptr


@dataclass
class Traffic:
    read: int = 0
    written: int = 0
    flops: int = 0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.read + other.read, self.written + other.written, self.flops + other.flops)


def _visible(pos: np.ndarray, size: int, stride: int, limit: int) -> np.ndarray:
    """Compressed keys whose last key is at or before each position (the kernels' n_vis)."""
    return np.minimum(np.where(pos >= size - 1, (pos - size + 1) // stride + 1, 0), limit)


def launch_traffic(launch: Launch, positions: np.ndarray, block_counts: np.ndarray | None = None) -> Traffic:
    """positions: (B, T) of the whole call; block_counts: the plan's block_cnt workspace after this chunk's
    selection ran, (B, Hkv, n) — needed for the selection and block attention launches of a sparse plan."""
    a = dict(launch.args)
    kernel = launch.config.kernel
    elem = DTYPE_BYTES[launch.config.dtype]
    c = dict(launch.config.constexprs)
    if kernel == "ternary_matmul_kernel":
        m, n, k = a["M"], a["N"], a["K"]
        grid_m = launch.grid[1]
        weights = n * a["n_tiles"] * 32 * grid_m  # 2-bit codes, re-read per M tile
        scales = n * 4 * (1 if c["GROUP"] == 0 else -(-k // c["GROUP"])) * grid_m
        return Traffic(weights + scales + m * k * elem * launch.grid[0], m * n * elem, 2 * m * n * k)
    if kernel == "int4_matmul_kernel":
        m, n, k = a["M"], a["N"], a["K"]
        grid_m, groups = launch.grid[1], k // c["GROUP"]
        weights = n * k // 2 + n * groups * elem + (n * -(-groups // 2) if c["HAS_ZEROS"] else 0)
        # codes, scales (x's dtype) and zero points, re-read per M tile; x re-read per N tile
        return Traffic(weights * grid_m + m * k * elem * launch.grid[0], m * n * elem, 2 * m * n * k)
    pos_ptr: Ptr = a["POS"]
    n_tok = a.get("n_tokens", launch.grid[0])
    pos = positions[:, pos_ptr.offset:pos_ptr.offset + n_tok]  # (B, n) this launch's tokens
    last = positions[:, -1:]  # a call's positions ascend per row: its last token holds the row's largest
    kv_heads = a["n_kv_heads"]
    if kernel == "cache_write_kernel":
        moved = pos.size * kv_heads * c["HEAD_DIM"] * elem
        return Traffic(moved + pos.size * 8, moved)
    if kernel == "compress_keys_kernel":
        size, stride, nk = a["kernel_size"], a["kernel_stride"], a["n_kernels"]
        new = _visible(pos[:, -1], size, stride, nk) - _visible(pos[:, 0] - 1, size, stride, nk)
        kernels = int(new.sum()) * kv_heads
        return Traffic(kernels * size * c["HEAD_DIM"] * elem, kernels * c["HEAD_DIM"] * 4,
                       kernels * size * c["HEAD_DIM"])
    sparse_rows = (last[:, 0] + 1 >= a.get("dense_len", 0))[:, None] & np.ones_like(pos, dtype=bool)
    if kernel == "stage1_scores_kernel":
        vis = _visible(pos, a["kernel_size"], a["kernel_stride"], a["n_kernels"]) * sparse_rows
        kc = int(vis.sum()) * kv_heads
        group, dim = c["GROUP"], c["HEAD_DIM"]
        q = int(sparse_rows.sum()) * kv_heads * group * dim * elem
        return Traffic(q + 2 * kc * dim * 4, kc * 4, 2 * 2 * group * kc * dim)  # two passes over the keys
    if kernel == "select_blocks_kernel":
        vis = _visible(pos, a["kernel_size"], a["kernel_stride"], a["n_kernels"])
        loads = 0
        for i in range(c["RATIO"] + 1):  # block b reads kernels b*RATIO - 1 + i that exist and are visible
            j = np.arange(c["NB_PAD"]) * c["RATIO"] - 1 + i
            loads += int(((j[None, None, :] >= 0) & (j[None, None, :] < vis[..., None]) & sparse_rows[..., None]).sum())
        if block_counts is None:
            raise ValueError("a select_blocks launch needs the block counts it wrote")
        chosen = int((block_counts * sparse_rows[:, None, :]).sum())
        return Traffic(loads * kv_heads * 4 + pos.size * 8, (chosen + int(sparse_rows.sum()) * kv_heads) * 4, 0)
    if kernel == "block_attention_kernel":
        block, group, dim = c["BLOCK_N"], c["GROUP"], c["HEAD_DIM"]
        own = pos // block
        blocks = np.broadcast_to((own + 1)[:, None, :], (pos.shape[0], kv_heads, pos.shape[1])).astype(np.int64)
        if not c["DENSE"]:
            if block_counts is None:
                raise ValueError("a sparse block_attention launch needs the block counts the selection wrote")
            blocks = np.where(sparse_rows[:, None, :], block_counts, blocks)
        # every visited block is whole but the query's own, read up to the query's position
        keys = (blocks - 1) * block + (pos % block + 1)[:, None, :]
        k_total = int(keys.sum())
        q = pos.size * kv_heads * group * dim * elem
        return Traffic(q + 2 * k_total * dim * elem, q, 4 * group * k_total * dim)
    raise KeyError(f"no traffic count for {kernel}")
