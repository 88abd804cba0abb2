"""Launch plans: what each custom op launches, as plain data (no torch, no Triton, no TensorRT here).

A plan names its buffers (inputs, outputs, state carried between calls, workspace slices with their byte
offsets) and lists its launches: the compiled kernel configuration, the grid, and every runtime argument by
the kernel's own parameter name — a pointer (buffer + element offset) or a scalar. One function makes each
launch and one function each op's plan; the Triton wrappers (attention/kernels.py, attention/selection.py,
ternary/kernels.py), the TensorRT plugins, the executors and the benchmark's byte counts all read them:
  executors.run_triton   the Triton kernels (JIT on a GPU, the interpreter on CPU with TRITON_INTERPRET=1)
  cuda_launch            the AOT cubins through the CUDA driver API (cuda-python), on TensorRT's stream
Launch parameters that are tuned (warps, tile sizes) live here as named constants, with the reason.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from trt_plugins.attention.config import InfLLMv2Config

DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "i32": 4, "i64": 8, "u8": 1, "i8": 1}
ALIGN = 256  # workspace slices start on 256 bytes, as TensorRT aligns its own allocations

MIN_DOT = 16  # tl.dot needs M, N, K >= 16
# Kernels scored per stage-1 iteration: 64 needs 255 registers and spills at head_dim 128 on sm_87; 32 does
# not (168 registers), measured with ptxas by `cpm-edge kernels compile`.
STAGE1_BLOCK_J = 32
STAGE1_WARPS = 8       # with 4 warps the head_dim-128 variant spills 96 bytes on sm_90 (ptxas)
COMPRESS_BLOCK_J = 16  # compressed keys written per program
COMPRESS_WARPS = 4
DENSE_BLOCK_N = 64     # keys per iteration of dense attention (any size works; one is compiled)
SPARSE_CHUNK = 256     # tokens per stage-1/selection pass: bounds the workspace of a long prefill
# Ternary GEMM tiles (BLOCK_M, BLOCK_N, num_warps): larger M tiles spill on sm_87 (255 registers + 100-700
# bytes, measured with ptxas), so prefill runs M in tiles of 16 and re-reads the (small, 2-bit) weight.
TERNARY_TILES = [(16, 64, 4)]
TERNARY_TILE_K = 128   # weights per packed tile (4 planes of 32)
# INT4 (W4A16) tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps); a K step never crosses a quantization group
# (BLOCK_K is capped at the group size), so it has one scale and one zero point per row. Decode
# (M <= INT4_GEMV_ROWS) runs one M tile, padded to tl.dot's 16, over narrow N tiles: 4096 outputs make 128
# programs, enough to keep every SM streaming weights. Prefill takes 64 rows a tile so each weight tile read
# serves 64 rows; its K step is 32 because steps of 64 and 128 spill on sm_87 (255 registers + 28-1752
# bytes, ptxas), 32 does not.
INT4_GEMV_ROWS = 8
INT4_GEMV_TILE = (16, 32, 64, 4)
INT4_GEMM_TILE = (64, 64, 32, 4)
INT4_GROUPS = (32, 64, 128)


def attention_warps(head_dim: int) -> int:
    """Warps of block_attention_kernel: at head_dim 128 four warps spill on sm_87 (ptxas), eight do not."""
    return 8 if head_dim >= 128 else 4


def select_warps(width: int) -> int:
    """Warps of select_blocks_kernel: rows of 1024+ blocks spill 8 bytes on sm_87 with 4 warps (ptxas)."""
    return 8 if width >= 1024 else 4


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def group_pad(group: int) -> int:
    """A GQA group padded to tl.dot's minimum M."""
    return max(MIN_DOT, next_power_of_2(group))


def nb_pad(n_blocks: int) -> int:
    """The compiled width of a score row: a power of two, at least 16."""
    return next_power_of_2(max(n_blocks, 16))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def n_kernels(cfg: InfLLMv2Config, capacity: int) -> int:
    """Compressed keys a cache of `capacity` positions holds: (S - size) // stride + 1."""
    return max(0, (capacity - cfg.kernel_size) // cfg.kernel_stride + 1)


def n_coarse_kernels(cfg: InfLLMv2Config, capacity: int) -> int:
    """Revision 2's coarse compressed keys a cache of `capacity` positions holds."""
    return max(0, (capacity - cfg.lse_kernel_size) // cfg.lse_kernel_stride + 1)


# --- the data --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """One compiled specialisation of a kernel: what the AOT compiler builds and a launch names."""
    kernel: str                      # function name in its kernels module
    module: str                      # "attention", "selection", "ternary" or "int4"
    dtype: str
    constexprs: tuple = ()           # ((name, value), ...)
    num_warps: int = 4

    @property
    def name(self) -> str:
        parts = [self.kernel, self.dtype] + [f"{k.lower()}{int(v)}" for k, v in self.constexprs
                                              if k not in ("UPCAST", "GROUP_PAD")]
        return "_".join(parts)


@dataclass(frozen=True)
class Ptr:
    """A pointer argument: a plan buffer plus an offset in elements of that buffer's dtype."""
    buffer: str
    offset: int = 0


@dataclass(frozen=True)
class Buffer:
    name: str
    dtype: str
    numel: int
    kind: str        # "input", "output", "state" (read and written in place) or "workspace"
    offset: int = 0  # workspace buffers: bytes from the start of the workspace

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Launch:
    config: KernelConfig
    grid: tuple           # (x, y, z)
    args: tuple           # ((parameter name, Ptr | int | float), ...): every runtime argument of the kernel

    def arg(self, name: str):
        return dict(self.args)[name]


@dataclass(frozen=True)
class Plan:
    buffers: tuple
    launches: tuple

    def buffer(self, name: str) -> Buffer:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def workspace_bytes(self) -> int:
        return max((b.offset + b.nbytes for b in self.buffers if b.kind == "workspace"), default=0)


def _launch(kernel: str, module: str, dtype: str, constexprs: dict, warps: int, grid: tuple, args: dict) -> Launch:
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return Launch(KernelConfig(kernel, module, dtype, tuple(constexprs.items()), warps), grid, tuple(args.items()))


def _strides(prefix: str, suffixes: str, strides) -> dict:
    """{'stride_qb': s0, 'stride_qh': s1, ...} in the kernels' naming."""
    if len(suffixes) != len(strides):
        raise ValueError(f"stride_{prefix}{suffixes}: {len(strides)} strides for {len(suffixes)} dimensions")
    if strides[-1] != 1:
        raise ValueError(f"stride_{prefix}{suffixes[-1]} must be 1 (innermost dimension contiguous), got {strides[-1]}")
    return {f"stride_{prefix}{s}": int(v) for s, v in zip(suffixes, strides)}


def contiguous(shape) -> tuple:
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= n
    return tuple(reversed(out))


# --- one function per launch ------------------------------------------------------------------------------
def cache_write_launch(new: Ptr, new_strides, cache: Ptr, cache_strides, pos: Ptr, pos_strides, *,
                       batch: int, tokens: int, kv_heads: int, head_dim: int, dtype: str) -> Launch:
    """CACHE[b, h, POS[b, t], :] = NEW[b, t, h, :] in place. new (B, T, Hkv, D), cache (B, Hkv, S, D)."""
    return _launch("cache_write_kernel", "attention", dtype, {"HEAD_DIM": head_dim}, 1, (tokens, batch * kv_heads), {
        "NEW": new, "CACHE": cache, "POS": pos, **_strides("n", "bthd", new_strides),
        **_strides("c", "bhsd", cache_strides), **_strides("p", "bt", pos_strides), "n_kv_heads": kv_heads})


def compress_keys_launch(k: Ptr, k_strides, kc: Ptr, kc_strides, pos: Ptr, pos_strides, *, batch: int,
                         kv_heads: int, tokens: int, kernels: int, head_dim: int, dtype: str,
                         cfg: InfLLMv2Config, coarse: bool = False) -> Launch:
    """Compressed keys completed by this call's positions, in place in KC (B, Hkv, NK, D) fp32; coarse:
    revision 2's coarse keys (lse_kernel_size keys every lse_kernel_stride), the same kernel.

    Kernel j (keys j*stride .. j*stride + size - 1) is written by the call whose positions reach its last key,
    so a call of T consecutive positions writes at most T // stride + 1 kernels; the programs loop if a row
    has more (full compression: positions 0 .. S-1 given as a two-element row)."""
    size, stride = (cfg.lse_kernel_size, cfg.lse_kernel_stride) if coarse else (cfg.kernel_size, cfg.kernel_stride)
    new = min(kernels, tokens // stride + 1)
    return _launch("compress_keys_kernel", "selection", dtype, {"HEAD_DIM": head_dim, "BLOCK_J": COMPRESS_BLOCK_J},
                   COMPRESS_WARPS, (max(1, cdiv(new, COMPRESS_BLOCK_J)), batch * kv_heads), {
                       "K": k, "KC": kc, "POS": pos, **_strides("k", "bhsd", k_strides),
                       **_strides("c", "bhjd", kc_strides), **_strides("p", "bt", pos_strides),
                       "n_kv_heads": kv_heads, "n_kernels": kernels, "n_tokens": tokens,
                       "kernel_size": size, "kernel_stride": stride})


def stage1_launch(q: Ptr, q_strides, kc: Ptr, kc_strides, pos: Ptr, pos_strides, out: Ptr, out_strides, *,
                  batch: int, tokens: int, kv_heads: int, group: int, head_dim: int, kernels: int, dtype: str,
                  cfg: InfLLMv2Config) -> Launch:
    """Stage-1 scores (B, Hkv, T, NK) fp32 of the visible compressed keys; rows below dense_len exit at once."""
    return _launch("stage1_scores_kernel", "attention", dtype, {
        "GROUP": group, "GROUP_PAD": group_pad(group), "HEAD_DIM": head_dim, "BLOCK_J": STAGE1_BLOCK_J},
        STAGE1_WARPS, (tokens, batch * kv_heads), {
            "Q": q, "KC": kc, "POS": pos, "OUT": out, **_strides("q", "bhtd", q_strides),
            **_strides("k", "bhjd", kc_strides), **_strides("p", "bt", pos_strides),
            **_strides("o", "bhtj", out_strides), "n_kv_heads": kv_heads, "n_kernels": kernels,
            "n_tokens": tokens, "kernel_size": cfg.kernel_size, "kernel_stride": cfg.kernel_stride,
            "dense_len": cfg.dense_len, "scale": 1.0 / head_dim ** 0.5})


def stage1_lse_launch(q: Ptr, q_strides, kc: Ptr, kc_strides, kc2: Ptr, kc2_strides, pos: Ptr, pos_strides,
                      out: Ptr, out_strides, *, batch: int, tokens: int, kv_heads: int, group: int, head_dim: int,
                      kernels: int, coarse_kernels: int, dtype: str, cfg: InfLLMv2Config) -> Launch:
    """Revision 2's stage-1 scores (B, Hkv, T, NK) fp32 of the visible compressed keys, normalised by the
    log-sum-exp over the visible coarse keys KC2 (B, Hkv, NK2, D); rows below dense_len exit at once."""
    return _launch("stage1_scores_lse_kernel", "attention", dtype, {
        "GROUP": group, "GROUP_PAD": group_pad(group), "HEAD_DIM": head_dim, "BLOCK_J": STAGE1_BLOCK_J},
        STAGE1_WARPS, (tokens, batch * kv_heads), {
            "Q": q, "KC": kc, "KC2": kc2, "POS": pos, "OUT": out, **_strides("q", "bhtd", q_strides),
            **_strides("k", "bhjd", kc_strides), **_strides("c", "bhjd", kc2_strides),
            **_strides("p", "bt", pos_strides), **_strides("o", "bhtj", out_strides), "n_kv_heads": kv_heads,
            "n_kernels": kernels, "n_coarse": coarse_kernels, "n_tokens": tokens, "kernel_size": cfg.kernel_size,
            "kernel_stride": cfg.kernel_stride, "lse_kernel_size": cfg.lse_kernel_size,
            "lse_kernel_stride": cfg.lse_kernel_stride, "dense_len": cfg.dense_len, "scale": 1.0 / head_dim ** 0.5})


def select_launch(scores: Ptr, score_strides, pos: Ptr, pos_strides, idx: Ptr, idx_strides, cnt: Ptr, cnt_strides,
                  *, batch: int, tokens: int, kv_heads: int, kernels: int, blocks: int,
                  cfg: InfLLMv2Config) -> Launch:
    """Block lists (ascending) and counts of one chunk of tokens by cfg.revision's rule; rows below dense_len
    exit at once. Revision 2 fills min(topk + window_blocks, blocks) places over every block."""
    constexprs = {"RATIO": cfg.block_size // cfg.kernel_stride, "NB_PAD": nb_pad(blocks)}
    n_pick = cfg.topk - cfg.init_blocks
    if cfg.revision == 2:  # revision 1's launches name no REVISION (the kernel's default)
        constexprs["REVISION"], n_pick = 2, min(cfg.max_selected, blocks)
    return _launch("select_blocks_kernel", "selection", "fp32", constexprs, select_warps(nb_pad(blocks)),
        (tokens, batch * kv_heads), {
            "S": scores, "POS": pos, "IDX": idx, "CNT": cnt, **_strides("s", "bhtj", score_strides),
            **_strides("p", "bt", pos_strides), **_strides("i", "bhti", idx_strides),
            **_strides("c", "bht", cnt_strides), "n_kv_heads": kv_heads, "n_kernels": kernels,
            "n_tokens": tokens, "n_blocks": blocks, "block_size": cfg.block_size, "kernel_size": cfg.kernel_size,
            "kernel_stride": cfg.kernel_stride, "init_blocks": cfg.init_blocks,
            "window_blocks": cfg.window_blocks, "n_pick": n_pick, "dense_len": cfg.dense_len})


def block_attention_launch(q: Ptr, q_strides, k: Ptr, k_strides, v: Ptr, v_strides, o: Ptr, o_strides,
                           pos: Ptr, pos_strides, idx: Ptr | None, idx_strides, cnt: Ptr | None, cnt_strides, *,
                           batch: int, tokens: int, kv_heads: int, group: int, head_dim: int, block_size: int,
                           dense_len: int, dtype: str) -> Launch:
    """Flash attention of each query's GQA group over its block list, or over every block up to its own
    (idx None: dense kernel; a sparse launch also goes dense for rows whose kv length is below dense_len)."""
    dense = idx is None
    if dense:  # the block list arguments exist in the signature but are never read
        idx, cnt, idx_strides, cnt_strides = Ptr("positions", 0), Ptr("positions", 0), (0, 0, 0, 1), (0, 0, 1)
    return _launch("block_attention_kernel", "attention", dtype, {
        "GROUP": group, "GROUP_PAD": group_pad(group), "HEAD_DIM": head_dim, "BLOCK_N": block_size,
        "DENSE": dense, "UPCAST": False}, attention_warps(head_dim), (tokens, batch * kv_heads), {
            "Q": q, "K": k, "V": v, "O": o, "POS": pos, "BLOCK_IDX": idx, "BLOCK_CNT": cnt,
            **_strides("q", "bhtd", q_strides), **_strides("k", "bhsd", k_strides),
            **_strides("v", "bhsd", v_strides), **_strides("o", "bhtd", o_strides),
            **_strides("p", "bt", pos_strides), **_strides("i", "bhti", idx_strides),
            **_strides("c", "bht", cnt_strides), "n_kv_heads": kv_heads, "n_tokens": tokens,
            "dense_len": dense_len, "scale": 1.0 / head_dim ** 0.5})


def ternary_launch(x: Ptr, x_strides, packed: Ptr, packed_strides, scales: Ptr, scale_strides, y: Ptr, y_strides, *,
                   rows: int, out_features: int, in_features: int, packed_cols: int, group: int,
                   dtype: str) -> Launch:
    """Y (M, N) = X (M, K) @ W^T from 2-bit codes (N, K_pad / 4) and fp32 scales (N, groups)."""
    block_m, block_n, warps = TERNARY_TILES[0]
    return _launch("ternary_matmul_kernel", "ternary", dtype, {
        "GROUP": group, "BLOCK_M": block_m, "BLOCK_N": block_n, "UPCAST": False}, warps,
        (cdiv(out_features, block_n), cdiv(rows, block_m)), {
            "X": x, "P": packed, "S": scales, "Y": y, "M": rows, "N": out_features, "K": in_features,
            "n_tiles": packed_cols * 4 // TERNARY_TILE_K, **_strides("x", "mk", x_strides),
            **_strides("p", "nk", packed_strides), "stride_sn": scale_strides[0], "stride_sg": scale_strides[1],
            **_strides("y", "mn", y_strides)})


def int4_launch(x: Ptr, x_strides, qweight: Ptr, q_strides, scales: Ptr, scale_strides, zeros: Ptr | None,
                zero_strides, y: Ptr, y_strides, *, rows: int, out_features: int, in_features: int,
                group_size: int, dtype: str) -> Launch:
    """Y (M, N) = X (M, K) @ W^T from nibble-packed codes (N, K / 2), scales (N, G) in X's dtype and packed
    zero points (N, ceil(G / 2)) or none (zero point 8). GEMV tiles for M <= INT4_GEMV_ROWS, else GEMM."""
    if group_size not in INT4_GROUPS or in_features % group_size:
        raise ValueError(f"int4 group_size {group_size}: must be one of {INT4_GROUPS} and divide in_features "
                         f"{in_features}")
    block_m, block_n, block_k, warps = INT4_GEMV_TILE if rows <= INT4_GEMV_ROWS else INT4_GEMM_TILE
    has_zeros = zeros is not None
    if not has_zeros:  # the zero-point arguments exist in the signature but are never read
        zeros, zero_strides = scales, (0, 1)
    return _launch("int4_matmul_kernel", "int4", dtype, {
        "GROUP": group_size, "HAS_ZEROS": has_zeros, "BLOCK_M": block_m, "BLOCK_N": block_n,
        "BLOCK_K": min(block_k, group_size), "UPCAST": False},
        warps, (cdiv(out_features, block_n), cdiv(rows, block_m)), {
            "X": x, "QW": qweight, "S": scales, "Z": zeros, "Y": y, "M": rows, "N": out_features,
            "K": in_features, **_strides("x", "mk", x_strides), **_strides("q", "nk", q_strides),
            **_strides("s", "ng", scale_strides), **_strides("z", "ng", zero_strides),
            **_strides("y", "mn", y_strides)})


# --- one function per op ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionShape:
    batch: int
    tokens: int
    heads: int
    kv_heads: int
    capacity: int     # S: positions in the cache
    head_dim: int
    kernels: int = -1  # NK: compressed keys the state holds; -1: all a cache of `capacity` can have
    coarse_kernels: int = -1  # NK2 (revision 2): coarse compressed keys the state holds; -1: all it can have


def _workspace(sizes: list[tuple[str, str, int]]) -> list[Buffer]:
    out, offset = [], 0
    for name, dtype, numel in sizes:
        out.append(Buffer(name, dtype, numel, "workspace", offset))
        offset += cdiv(numel * DTYPE_BYTES[dtype], ALIGN) * ALIGN
    return out


@functools.lru_cache(maxsize=256)
def attention_plan(shape: AttentionShape, dtype: str, sparse: InfLLMv2Config | None) -> Plan:
    """CpmAttention: write k, v into the caches at `positions`, then attend.

    Buffers (the plugin's tensors, row-major): q, out (B, T, H*D); k, v (B, T, Hkv*D); k_cache, v_cache
    (B, Hkv, S, D) state; positions (B, T) int64 — a row's positions in one call are consecutive. Sparse
    models add kc (B, Hkv, NK, D) fp32 state, the compressed keys, extended by the kernels this call
    completes, and workspace for one chunk of SPARSE_CHUNK tokens: stage-1 scores, block lists, counts.
    Revision 2 (MiniCPM4.1) adds kc2 (B, Hkv, NK2, D) fp32 state, the coarse keys stage 1 normalises with,
    extended the same way, and selects by its own rule; its workspace is revision 1's.
    """
    B, T, H, Hkv, S, D = (shape.batch, shape.tokens, shape.heads, shape.kv_heads, shape.capacity, shape.head_dim)
    G = H // Hkv
    buffers = [Buffer("q", dtype, B * T * H * D, "input"), Buffer("k", dtype, B * T * Hkv * D, "input"),
               Buffer("v", dtype, B * T * Hkv * D, "input"), Buffer("k_cache", dtype, B * Hkv * S * D, "state"),
               Buffer("v_cache", dtype, B * Hkv * S * D, "state"), Buffer("positions", "i64", B * T, "input"),
               Buffer("out", dtype, B * T * H * D, "output")]
    new = (T * Hkv * D, Hkv * D, D, 1)      # k, v (B, T, Hkv, D)
    cache = (Hkv * S * D, S * D, D, 1)      # caches (B, Hkv, S, D)
    seq = (T * H * D, D, H * D, 1)          # q and out (B, T, H*D) read as (B, H, T, D)
    pos = (T, 1)
    common = dict(batch=B, kv_heads=Hkv, head_dim=D, dtype=dtype)
    launches = [cache_write_launch(Ptr(src), new, Ptr(dst), cache, Ptr("positions"), pos, tokens=T, **common)
                for src, dst in (("k", "k_cache"), ("v", "v_cache"))]
    if sparse is None:
        launches.append(block_attention_launch(
            Ptr("q"), seq, Ptr("k_cache"), cache, Ptr("v_cache"), cache, Ptr("out"), seq, Ptr("positions"), pos,
            None, None, None, None, tokens=T, group=G, block_size=DENSE_BLOCK_N, dense_len=0, **common))
        return Plan(tuple(buffers), tuple(launches))

    cfg = sparse
    NK, NB = shape.kernels if shape.kernels >= 0 else n_kernels(cfg, S), cdiv(S, cfg.block_size)
    chunk = min(T, SPARSE_CHUNK)
    width = min(NB, cfg.max_selected)
    kc = (Hkv * NK * D, NK * D, D, 1)
    buffers.append(Buffer("kc", "fp32", B * Hkv * NK * D, "state"))
    rev2 = cfg.revision == 2
    if rev2:
        NK2 = shape.coarse_kernels if shape.coarse_kernels >= 0 else n_coarse_kernels(cfg, S)
        kc2 = (Hkv * NK2 * D, NK2 * D, D, 1)
        buffers.append(Buffer("kc2", "fp32", B * Hkv * NK2 * D, "state"))
    buffers += _workspace([("scores", "fp32", B * Hkv * chunk * NK), ("block_idx", "i32", B * Hkv * chunk * width),
                           ("block_cnt", "i32", B * Hkv * chunk)])
    launches.append(compress_keys_launch(Ptr("k_cache"), cache, Ptr("kc"), kc, Ptr("positions"), pos, batch=B,
                                         kv_heads=Hkv, tokens=T, kernels=NK, head_dim=D, dtype=dtype, cfg=cfg))
    if rev2:
        launches.append(compress_keys_launch(Ptr("k_cache"), cache, Ptr("kc2"), kc2, Ptr("positions"), pos,
                                             batch=B, kv_heads=Hkv, tokens=T, kernels=NK2, head_dim=D, dtype=dtype,
                                             cfg=cfg, coarse=True))
    for t0 in range(0, T, chunk):
        n = min(chunk, T - t0)
        q_t, pos_t = Ptr("q", t0 * H * D), Ptr("positions", t0)
        scores = (Hkv * n * NK, n * NK, NK, 1)
        idx = (Hkv * n * width, n * width, width, 1)
        cnt = (Hkv * n, n, 1)
        if rev2:
            launches.append(stage1_lse_launch(q_t, seq, Ptr("kc"), kc, Ptr("kc2"), kc2, pos_t, pos, Ptr("scores"),
                                              scores, batch=B, tokens=n, kv_heads=Hkv, group=G, head_dim=D,
                                              kernels=NK, coarse_kernels=NK2, dtype=dtype, cfg=cfg))
        else:
            launches.append(stage1_launch(q_t, seq, Ptr("kc"), kc, pos_t, pos, Ptr("scores"), scores, batch=B,
                                          tokens=n, kv_heads=Hkv, group=G, head_dim=D, kernels=NK, dtype=dtype,
                                          cfg=cfg))
        launches.append(select_launch(Ptr("scores"), scores, pos_t, pos, Ptr("block_idx"), idx, Ptr("block_cnt"), cnt,
                                      batch=B, tokens=n, kv_heads=Hkv, kernels=NK, blocks=NB, cfg=cfg))
        launches.append(block_attention_launch(
            q_t, seq, Ptr("k_cache"), cache, Ptr("v_cache"), cache, Ptr("out", t0 * H * D), seq, pos_t, pos,
            Ptr("block_idx"), idx, Ptr("block_cnt"), cnt, tokens=n, group=G, block_size=cfg.block_size,
            dense_len=cfg.dense_len, batch=B, kv_heads=Hkv, head_dim=D, dtype=dtype))
    return Plan(tuple(buffers), tuple(launches))


@functools.lru_cache(maxsize=256)
def ternary_plan(rows: int, out_features: int, in_features: int, packed_cols: int, groups: int, group: int,
                 dtype: str) -> Plan:
    """CpmTernaryGemm: y (M, N) = x (M, K) @ W^T; packed codes (N, packed_cols) uint8, scales (N, groups) fp32."""
    buffers = (Buffer("x", dtype, rows * in_features, "input"), Buffer("packed", "u8", out_features * packed_cols, "input"),
               Buffer("scales", "fp32", out_features * groups, "input"), Buffer("y", dtype, rows * out_features, "output"))
    launch = ternary_launch(Ptr("x"), (in_features, 1), Ptr("packed"), (packed_cols, 1), Ptr("scales"), (groups, 1),
                            Ptr("y"), (out_features, 1), rows=rows, out_features=out_features,
                            in_features=in_features, packed_cols=packed_cols, group=group, dtype=dtype)
    return Plan(buffers, (launch,))


@functools.lru_cache(maxsize=256)
def int4_plan(rows: int, out_features: int, in_features: int, group_size: int, has_zeros: bool,
              dtype: str) -> Plan:
    """CpmInt4Gemm: y (M, N) = x (M, K) @ W^T; qweight (N, K / 2) uint8, scales (N, G) in x's dtype, zeros
    (N, ceil(G / 2)) uint8 when has_zeros (else symmetric: zero point 8). G = K / group_size."""
    N, K = out_features, in_features
    G = K // group_size
    buffers = [Buffer("x", dtype, rows * K, "input"), Buffer("qweight", "u8", N * K // 2, "input"),
               Buffer("scales", dtype, N * G, "input")]
    zeros = None
    if has_zeros:
        buffers.append(Buffer("zeros", "u8", N * cdiv(G, 2), "input"))
        zeros = Ptr("zeros")
    buffers.append(Buffer("y", dtype, rows * N, "output"))
    launch = int4_launch(Ptr("x"), (K, 1), Ptr("qweight"), (K // 2, 1), Ptr("scales"), (G, 1), zeros,
                         (cdiv(G, 2), 1), Ptr("y"), (N, 1), rows=rows, out_features=N, in_features=K,
                         group_size=group_size, dtype=dtype)
    return Plan(tuple(buffers), (launch,))
