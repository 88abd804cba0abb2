"""`cpm-edge kernels compile` on a machine without a GPU: PTX + cubin + report, no unaccepted spills."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CPM = str(Path(sys.executable).with_name("cpm-edge"))


def run(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, don't interpret
    return subprocess.run([CPM, "kernels", "compile", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd)


def test_compile_every_engine_kernel_for_orin(tmp_path, tiny_models):
    out = tmp_path / "kernels"
    proc = run("--target", "sm_87", "--out", out, "--model", tiny_models["sparse"])
    assert proc.returncode == 0, proc.stderr  # also fails on spills not accepted in accepted_spills.json
    report = json.loads((out / "report.json").read_text())
    assert report["targets"] == ["sm_87"] and report["ptx_version"] == 85 and report["unaccepted_spills"] == []
    kinds = {k["kernel"] for k in report["kernels"]}
    assert kinds == {"block_attention_kernel", "stage1_scores_kernel", "ternary_matmul_kernel", "cache_write_kernel",
                     "compress_keys_kernel", "select_blocks_kernel"}
    for k in report["kernels"]:
        ptx = (out / "sm_87" / f"{k['config']}.ptx").read_text()
        assert ".version 8.5" in ptx and ".target sm_87" in ptx and f".entry {k['entry']}" in ptx
        cubin = (out / "sm_87" / f"{k['config']}.cubin").read_bytes()
        assert cubin[:4] == b"\x7fELF"  # a device ELF, loadable with cuModuleLoadData
        assert 0 < k["registers"] <= 255 and k["shared_bytes"] >= 0
    # Both the dense and the sparse attention kernel exist for every shape, in both dtypes.
    dense = {k["config"] for k in report["kernels"] if k["config"].endswith("dense1")}
    assert any("head_dim128" in c and "bf16" in c for c in dense)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".triton-cache", "kernels"]  # no half-written output


def test_bad_target_is_refused(tmp_path):
    proc = run("--target", "sm_87,gfx90a", "--out", tmp_path / "k")
    assert proc.returncode == 2 and "gfx90a" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "k").exists()
