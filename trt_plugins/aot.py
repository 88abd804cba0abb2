"""Ahead-of-time compilation of every kernel configuration the engines use, for any NVIDIA target,
on a machine without a GPU (Triton's bundled ptxas): PTX + cubin + report.json.

A configuration fixes what a kernel is specialised on: dtype, head_dim, GQA group, block size, mode.
Innermost strides are compile-time 1 (the plugins pass contiguous tensors) so loads vectorise, and
pointers are declared 16-byte aligned (TensorRT and CUDA allocations are 256-byte aligned).

PTX ISA: 8.5 (`ptx_version=85`), the newest the CUDA 12.6 driver of JetPack 6 can JIT. The plugins load
the cubin; the PTX is there for drivers of a newer GPU generation.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from trt_plugins import plans
from trt_plugins.attention.config import InfLLMv2Config
from trt_plugins.plans import KernelConfig

PTX_VERSION = 85
ACCEPTED_SPILLS = Path(__file__).with_name("accepted_spills.json")

# (name, head_dim, GQA group, block_size): the attention shapes of the released models and the tiny ones.
ATTENTION_SHAPES = [
    ("MiniCPM4-0.5B", 64, 8, 64),
    ("MiniCPM4-8B", 128, 16, 64),
    ("tiny", 64, 2, 32),
]
DTYPES = ("fp16", "bf16")
TERNARY_GROUPS = (0, 32, 64, 128)  # 0: one scale per row (or per tensor)
SPARSE_RATIO = 4                   # block_size / kernel_stride of the published (and the tiny) sparse_config
SELECT_WIDTHS = tuple(2**i for i in range(4, 13))  # score rows of 16 .. 4096 blocks (contexts up to 256K)


@dataclass
class Target:
    arch: int

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


def parse_targets(text: str) -> list[Target]:
    targets = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*sm_?(\d{2,3})\s*", part)
        if not m or int(m.group(1)) < 75:
            raise ValueError(f"--target: {part.strip()!r} is not an NVIDIA target like sm_87 (sm_75 or newer)")
        targets.append(Target(int(m.group(1))))
    return targets


def engine_configs(shapes=ATTENTION_SHAPES, dtypes=DTYPES) -> list[KernelConfig]:
    """Every configuration the engines launch: collected from the plugins' own plans (plans.py) for each
    attention shape, dtype, selection width, ternary scale layout and int4 group, so nothing launched is left
    uncompiled."""
    configs: dict[str, KernelConfig] = {}

    def add(plan):
        for launch in plan.launches:
            configs.setdefault(launch.config.name, launch.config)

    for _, head_dim, group, block in shapes:
        sparse = [InfLLMv2Config(kernel_size=2 * block // SPARSE_RATIO, kernel_stride=block // SPARSE_RATIO,
                                 block_size=block, window_size=block, topk=2, dense_len=0, revision=revision)
                  for revision in (1, 2)]  # 2 (MiniCPM4.1): the log-sum-exp stage 1, its own selection rule
        for dtype in dtypes:
            shape = plans.AttentionShape(1, 1, group, 1, 16 * block, head_dim)
            add(plans.attention_plan(shape, dtype, None))
            for width in SELECT_WIDTHS:  # cache capacities whose block count needs each compiled row width
                for cfg in sparse:
                    add(plans.attention_plan(plans.AttentionShape(1, 1, group, 1, width * block, head_dim), dtype, cfg))
    for dtype in dtypes:
        for group in TERNARY_GROUPS:
            add(plans.ternary_plan(1, 64, 128, 32, 1 if group == 0 else 128 // group, group, dtype))
        for group in plans.INT4_GROUPS:  # decode (GEMV tile) and prefill (GEMM tile), symmetric and with zeros
            for rows in (1, plans.INT4_GEMV_ROWS + 1):
                for has_zeros in (False, True):
                    add(plans.int4_plan(rows, 64, 256, group, has_zeros, dtype))
    return list(configs.values())


# Argument lists: name -> type; "*T" pointers of the activation dtype, "1" an innermost stride fixed to 1.
SIGNATURES = {
    "block_attention_kernel": [
        ("Q", "*T"), ("K", "*T"), ("V", "*T"), ("O", "*T"), ("POS", "*i64"), ("BLOCK_IDX", "*i32"),
        ("BLOCK_CNT", "*i32"),
        ("stride_qb", "i32"), ("stride_qh", "i32"), ("stride_qt", "i32"), ("stride_qd", "1"),
        ("stride_kb", "i32"), ("stride_kh", "i32"), ("stride_ks", "i32"), ("stride_kd", "1"),
        ("stride_vb", "i32"), ("stride_vh", "i32"), ("stride_vs", "i32"), ("stride_vd", "1"),
        ("stride_ob", "i32"), ("stride_oh", "i32"), ("stride_ot", "i32"), ("stride_od", "1"),
        ("stride_pb", "i32"), ("stride_pt", "1"),
        ("stride_ib", "i32"), ("stride_ih", "i32"), ("stride_it", "i32"), ("stride_ii", "1"),
        ("stride_cb", "i32"), ("stride_ch", "i32"), ("stride_ct", "1"),
        ("n_kv_heads", "i32"), ("n_tokens", "i32"), ("dense_len", "i32"), ("scale", "fp32")],
    "stage1_scores_kernel": [
        ("Q", "*T"), ("KC", "*fp32"), ("POS", "*i64"), ("OUT", "*fp32"),
        ("stride_qb", "i32"), ("stride_qh", "i32"), ("stride_qt", "i32"), ("stride_qd", "1"),
        ("stride_kb", "i32"), ("stride_kh", "i32"), ("stride_kj", "i32"), ("stride_kd", "1"),
        ("stride_pb", "i32"), ("stride_pt", "1"),
        ("stride_ob", "i32"), ("stride_oh", "i32"), ("stride_ot", "i32"), ("stride_oj", "1"),
        ("n_kv_heads", "i32"), ("n_kernels", "i32"), ("n_tokens", "i32"), ("kernel_size", "i32"),
        ("kernel_stride", "i32"), ("dense_len", "i32"), ("scale", "fp32")],
    "stage1_scores_lse_kernel": [
        ("Q", "*T"), ("KC", "*fp32"), ("KC2", "*fp32"), ("POS", "*i64"), ("OUT", "*fp32"),
        ("stride_qb", "i32"), ("stride_qh", "i32"), ("stride_qt", "i32"), ("stride_qd", "1"),
        ("stride_kb", "i32"), ("stride_kh", "i32"), ("stride_kj", "i32"), ("stride_kd", "1"),
        ("stride_cb", "i32"), ("stride_ch", "i32"), ("stride_cj", "i32"), ("stride_cd", "1"),
        ("stride_pb", "i32"), ("stride_pt", "1"),
        ("stride_ob", "i32"), ("stride_oh", "i32"), ("stride_ot", "i32"), ("stride_oj", "1"),
        ("n_kv_heads", "i32"), ("n_kernels", "i32"), ("n_coarse", "i32"), ("n_tokens", "i32"),
        ("kernel_size", "i32"), ("kernel_stride", "i32"), ("lse_kernel_size", "i32"), ("lse_kernel_stride", "i32"),
        ("dense_len", "i32"), ("scale", "fp32")],
    "cache_write_kernel": [
        ("NEW", "*T"), ("CACHE", "*T"), ("POS", "*i64"),
        ("stride_nb", "i32"), ("stride_nt", "i32"), ("stride_nh", "i32"), ("stride_nd", "1"),
        ("stride_cb", "i32"), ("stride_ch", "i32"), ("stride_cs", "i32"), ("stride_cd", "1"),
        ("stride_pb", "i32"), ("stride_pt", "1"), ("n_kv_heads", "i32")],
    "compress_keys_kernel": [
        ("K", "*T"), ("KC", "*fp32"), ("POS", "*i64"),
        ("stride_kb", "i32"), ("stride_kh", "i32"), ("stride_ks", "i32"), ("stride_kd", "1"),
        ("stride_cb", "i32"), ("stride_ch", "i32"), ("stride_cj", "i32"), ("stride_cd", "1"),
        ("stride_pb", "i32"), ("stride_pt", "1"),
        ("n_kv_heads", "i32"), ("n_kernels", "i32"), ("n_tokens", "i32"), ("kernel_size", "i32"),
        ("kernel_stride", "i32")],
    "select_blocks_kernel": [
        ("S", "*fp32"), ("POS", "*i64"), ("IDX", "*i32"), ("CNT", "*i32"),
        ("stride_sb", "i32"), ("stride_sh", "i32"), ("stride_st", "i32"), ("stride_sj", "1"),
        ("stride_pb", "i32"), ("stride_pt", "1"),
        ("stride_ib", "i32"), ("stride_ih", "i32"), ("stride_it", "i32"), ("stride_ii", "1"),
        ("stride_cb", "i32"), ("stride_ch", "i32"), ("stride_ct", "1"),
        ("n_kv_heads", "i32"), ("n_kernels", "i32"), ("n_tokens", "i32"), ("n_blocks", "i32"),
        ("block_size", "i32"), ("kernel_size", "i32"), ("kernel_stride", "i32"), ("init_blocks", "i32"),
        ("window_blocks", "i32"), ("n_pick", "i32"), ("dense_len", "i32")],
    "ternary_matmul_kernel": [
        ("X", "*T"), ("P", "*u8"), ("S", "*fp32"), ("Y", "*T"), ("M", "i32"), ("N", "i32"), ("K", "i32"),
        ("n_tiles", "i32"),
        ("stride_xm", "i32"), ("stride_xk", "1"), ("stride_pn", "i32"), ("stride_pk", "1"),
        ("stride_sn", "i32"), ("stride_sg", "i32"), ("stride_ym", "i32"), ("stride_yn", "1")],
    "int4_matmul_kernel": [
        ("X", "*T"), ("QW", "*u8"), ("S", "*T"), ("Z", "*u8"), ("Y", "*T"), ("M", "i32"), ("N", "i32"),
        ("K", "i32"),
        ("stride_xm", "i32"), ("stride_xk", "1"), ("stride_qn", "i32"), ("stride_qk", "1"),
        ("stride_sn", "i32"), ("stride_sg", "1"), ("stride_zn", "i32"), ("stride_zg", "1"),
        ("stride_ym", "i32"), ("stride_yn", "1")],
}


def _kernel_fn(cfg: KernelConfig):
    """The kernel's JITFunction. A process that set TRITON_INTERPRET=1 cannot compile (Triton's interpreter
    takes over code generation): compile in a process of its own, as `cpm-edge kernels compile` does."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: run the AOT compiler in a process without it")
    if cfg.module == "attention":
        from trt_plugins.attention import kernels
    elif cfg.module == "selection":
        from trt_plugins.attention import selection as kernels
    elif cfg.module == "int4":
        from trt_plugins.int4 import kernels
    else:
        from trt_plugins.ternary import kernels
    return getattr(kernels, cfg.kernel)


def compile_config(cfg: KernelConfig, target: Target):
    """Compile one configuration for one target; returns Triton's compiled kernel (asm + metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fn(cfg)
    signature, constexprs, attrs = {}, {}, {}
    for i, (arg, kind) in enumerate(SIGNATURES[cfg.kernel]):
        if kind == "1":
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            signature[arg] = kind.replace("T", cfg.dtype)
            if kind.startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    for arg, value in cfg.constexprs:
        signature[arg], constexprs[arg] = "constexpr", value
    for p in fn.params:  # constexprs a configuration leaves to the kernel's default (select's REVISION)
        if p.name not in signature and p.is_constexpr and p.has_default:
            signature[p.name], constexprs[p.name] = "constexpr", p.default
    missing = [a for a in fn.arg_names if a not in signature]
    if missing:
        raise RuntimeError(f"{cfg.kernel}: SIGNATURES lacks {missing}")
    src = ASTSource(fn=fn, signature={a: signature[a] for a in fn.arg_names}, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", target.arch, 32),
                          options={"num_warps": cfg.num_warps, "ptx_version": PTX_VERSION})


def ptxas_resources(ptx: str, target: Target) -> dict:
    """Registers, spills and static shared memory as ptxas reports them (-v)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(target.arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()}")
    text = proc.stderr

    def grab(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack_frame": grab(r"(\d+) bytes stack frame")}


@dataclass
class CompileReport:
    targets: list[str]
    ptx_version: int
    kernels: list[dict] = field(default_factory=list)
    unaccepted_spills: list[str] = field(default_factory=list)


def accepted_spills() -> dict:
    """{config name: {target: bytes, "why": text}}: spills someone looked at and accepted in writing."""
    if not ACCEPTED_SPILLS.exists():
        return {}
    return json.loads(ACCEPTED_SPILLS.read_text())


def compile_all(targets: list[Target], out_dir: Path, configs: list[KernelConfig] | None = None,
                progress=None) -> CompileReport:
    """Compile every configuration for every target into out_dir/<target>/<config>.{ptx,cubin,json}."""
    import triton

    configs = configs or engine_configs()
    report = CompileReport([t.name for t in targets], PTX_VERSION)
    accepted = accepted_spills()
    total, done = len(configs) * len(targets), 0
    for target in targets:
        tdir = out_dir / target.name
        tdir.mkdir(parents=True, exist_ok=True)
        for cfg in configs:
            kernel = compile_config(cfg, target)
            resources = ptxas_resources(kernel.asm["ptx"], target)
            (tdir / f"{cfg.name}.ptx").write_text(kernel.asm["ptx"])
            (tdir / f"{cfg.name}.cubin").write_bytes(kernel.asm["cubin"])
            entry = {"config": cfg.name, "kernel": cfg.kernel, "target": target.name, "dtype": cfg.dtype,
                     "constexprs": {k: v for k, v in cfg.constexprs}, "num_warps": cfg.num_warps,
                     "entry": kernel.metadata.name, "shared_bytes": kernel.metadata.shared,
                     "cubin_sha256": hashlib.sha256(kernel.asm["cubin"]).hexdigest(),
                     "args": [a for a, kind in SIGNATURES[cfg.kernel] if kind != "1"],
                     "arg_types": [kind.replace("T", cfg.dtype) for _, kind in SIGNATURES[cfg.kernel] if kind != "1"],
                     "profile_scratch_size": getattr(kernel.metadata, "profile_scratch_size", 0),
                     "threads": 32 * cfg.num_warps,
                     "global_scratch_size": getattr(kernel.metadata, "global_scratch_size", 0),
                     "params": len(re.findall(rf"\.param [^\n]*{kernel.metadata.name}_param_\d+", kernel.asm["ptx"])),
                     **resources}
            (tdir / f"{cfg.name}.json").write_text(json.dumps(entry, indent=2))
            report.kernels.append(entry)
            spilled = resources["spill_stores"] + resources["spill_loads"]
            if spilled and spilled > accepted.get(cfg.name, {}).get(target.name, 0):
                report.unaccepted_spills.append(f"{cfg.name} on {target.name}: {spilled} bytes of spills")
            done += 1
            if progress:
                progress(done, total, f"{target.name} {cfg.name}")
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps({"triton": triton.__version__, "ptx_version": report.ptx_version,
                                       "targets": report.targets, "unaccepted_spills": report.unaccepted_spills,
                                       "kernels": report.kernels}, indent=2) + "\n")
    return report


def build_cache_env(cache_dir: Path):
    """Keep Triton's cache inside the build tree, and FP fusion as Triton 3.9 defaults it."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
