"""`cpm-edge kernels compile` on a machine without a GPU: PTX + cubin + report, no unaccepted spills."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

CPM = str(Path(sys.executable).with_name("cpm-edge"))


def run(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    return subprocess.run([CPM, "kernels", "compile", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd)


@pytest.fixture(scope="module")
def orin_kernels(tmp_path_factory, tiny_models):
    """Every engine kernel compiled for sm_87 (Triton's bundled ptxas, no GPU), with the tiny models' shapes."""
    tmp_path = tmp_path_factory.mktemp("aot")
    proc = run("--target", "sm_87", "--out", tmp_path / "kernels", "--model", tiny_models["sparse"], cwd=tmp_path)
    return tmp_path, proc


def test_compile_every_engine_kernel_for_orin(orin_kernels):
    tmp_path, proc = orin_kernels
    out = tmp_path / "kernels"
    assert proc.returncode == 0, proc.stderr  # also fails on spills not accepted in accepted_spills.json
    report = json.loads((out / "report.json").read_text())
    assert report["targets"] == ["sm_87"] and report["ptx_version"] == 85 and report["unaccepted_spills"] == []
    kinds = {k["kernel"] for k in report["kernels"]}
    assert kinds == {"block_attention_kernel", "stage1_scores_kernel", "stage1_scores_lse_kernel",
                     "ternary_matmul_kernel", "cache_write_kernel", "compress_keys_kernel", "select_blocks_kernel",
                     "int4_matmul_kernel"}
    for k in report["kernels"]:
        ptx = (out / "sm_87" / f"{k['config']}.ptx").read_text()
        assert ".version 8.5" in ptx and ".target sm_87" in ptx and f".entry {k['entry']}" in ptx
        cubin = (out / "sm_87" / f"{k['config']}.cubin").read_bytes()
        assert cubin[:4] == b"\x7fELF"  # a device ELF, loadable with cuModuleLoadData
        assert 0 < k["registers"] <= 255 and k["shared_bytes"] >= 0
    # Both the dense and the sparse attention kernel exist for every shape, in both dtypes.
    dense = {k["config"] for k in report["kernels"] if k["config"].endswith("dense1")}
    assert any("head_dim128" in c and "bf16" in c for c in dense)
    assert {p.name for p in tmp_path.iterdir()} - {".triton-cache"} == {"kernels"}  # no half-written output


def test_bad_target_is_refused(tmp_path):
    proc = run("--target", "sm_87,gfx90a", "--out", tmp_path / "k")
    assert proc.returncode == 2 and "gfx90a" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "k").exists()


PTX_PARAM = re.compile(r"\.param\s+\.(\w+)(\s+\.ptr)?[^\n]*?_param_(\d+)")
PTX_SIZES = {"u64": 8, "b64": 8, "s64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4}


def ptx_parameters(ptx: str, entry: str) -> list[tuple[str, bool]]:
    """(type, is pointer) of every parameter of the kernel's .entry, as the compiled code declares them."""
    start = ptx.index(f".entry {entry}(")
    block = ptx[start:ptx.index(")", start)]
    params = [(m.group(1), bool(m.group(2)), int(m.group(3))) for m in PTX_PARAM.finditer(block)]
    assert [i for *_, i in params] == list(range(len(params)))
    return [(kind, ptr) for kind, ptr, _ in params]


def test_gpu_argument_packing_matches_each_compiled_kernel(orin_kernels, seed):
    """Every launch of the plugins' plans, packed for cuLaunchKernel, against the parameters the kernel's PTX
    declares: count, size and pointer-ness of each, and the pointer values (buffer base + element offset)."""
    import ctypes

    from trt_plugins import plans
    from trt_plugins.attention.config import InfLLMv2Config
    from trt_plugins.cuda_launch import LaunchError, address_resolver, pack_arguments

    tmp_path, proc = orin_kernels
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "kernels" / "sm_87"
    tiny = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=4, dense_len=128)
    tiny2 = InfLLMv2Config(kernel_size=16, kernel_stride=8, block_size=32, window_size=64, topk=4, dense_len=128,
                           revision=2)  # MiniCPM4.1: the log-sum-exp stage 1 and REVISION=2 selection
    cases = [plans.attention_plan(plans.AttentionShape(2, t, 4, 2, 256, 64), dtype, sparse)
             for t in (1, random.randint(2, 300)) for dtype in ("fp16", "bf16") for sparse in (None, tiny, tiny2)]
    cases += [plans.ternary_plan(random.randint(1, 40), 768, 256, 64, groups, group, "fp16")
              for group, groups in ((0, 1), (32, 8), (128, 2))]
    cases += [plans.int4_plan(rows, 768, 512, group, zeros, dtype)  # GEMV and GEMM tiles, with and without zeros
              for rows in (random.randint(1, 8), random.randint(9, 300)) for group in plans.INT4_GROUPS
              for zeros in (False, True) for dtype in ("fp16", "bf16")]
    checked = 0
    for plan in cases:
        bases = {b.name: random.randrange(1, 2**40) * 256 for b in plan.buffers if b.kind != "workspace"}
        workspace = random.randrange(1, 2**40) * 256
        address_of = address_resolver(plan, bases, workspace)
        for launch in plan.launches:
            meta = json.loads((folder / f"{launch.config.name}.json").read_text())
            ptx = (folder / f"{launch.config.name}.ptx").read_text()
            declared = ptx_parameters(ptx, meta["entry"])
            packed = pack_arguments(launch, meta, address_of)
            assert len(packed) == len(declared), launch.config.name
            for value, (kind, is_pointer) in zip(packed, declared):
                assert ctypes.sizeof(value) == PTX_SIZES[kind], (launch.config.name, kind)
                assert isinstance(value, ctypes.c_float) == (kind == "f32")
                assert not is_pointer or isinstance(value, ctypes.c_uint64)
            for (name, arg), value in zip([(n, dict(launch.args)[n]) for n in meta["args"]], packed):
                if isinstance(arg, plans.Ptr):
                    b = plan.buffer(arg.buffer)
                    base = workspace + b.offset if b.kind == "workspace" else bases[b.name]
                    assert value.value == base + arg.offset * plans.DTYPE_BYTES[b.dtype], name
            checked += 1
    assert checked > 50
    # a plan that disagrees with the compiled kernel is refused before anything reaches the driver
    launch = cases[0].launches[0]
    meta = json.loads((folder / f"{launch.config.name}.json").read_text())
    bad = plans.Launch(launch.config, launch.grid, tuple((n, 2) if n == "stride_nd" else (n, v) for n, v in launch.args))
    with pytest.raises(LaunchError, match="compiled in as 1"):
        pack_arguments(bad, meta, address_resolver(cases[0], {b.name: 256 for b in cases[0].buffers}, 0))
