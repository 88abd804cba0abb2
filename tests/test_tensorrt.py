"""TensorRT-RTX builds engines from the trt-flavor graphs of the three tiny models with the kit's plugins
(no GPU needed), and the plugins' kernel launches match the kernels compiled ahead of time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from export.onnx_export import ExportOptions, export
from trt_plugins.engine_builder import EngineShapes

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")

BUILD_SCRIPT = """
import json, sys
from pathlib import Path
from trt_plugins.engine_builder import EngineShapes, build_engine
info = json.loads(Path(sys.argv[1], "export.json").read_text())
shapes = EngineShapes.from_export(info, 2)
blob, meta = build_engine(Path(sys.argv[1], "model.onnx"), shapes, "tensorrt-rtx")
Path(sys.argv[2]).write_bytes(blob)
print(json.dumps(meta))
"""


@pytest.mark.parametrize("variant", ["dense", "sparse", "ternary", "minicpm5"])
def test_tensorrt_rtx_builds_engine_with_our_plugins(variant, tiny_models, tmp_path):
    out = export(ExportOptions(tiny_models[variant], tmp_path / "e", "trt", "fp16", 256))
    # A subprocess: a TensorRT build that fails inside a Python plugin can take its process down.
    proc = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(out), str(tmp_path / "engine.plan")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_plugins = 2 + (14 if variant == "ternary" else 0)  # attention per layer (+ 7 projections each)
    assert meta["plugin_layers"] == expected_plugins and meta["tensorrt_module"] == "tensorrt_rtx"
    blob = (tmp_path / "engine.plan").read_bytes()
    assert len(blob) > 100_000 and b"CpmAttention" in blob and b"cpm_edge" in blob


class RecordingExecutor:
    """Stands in for the CUDA driver only (this machine has no GPU): receives what the plugin hands
    trt_plugins/cuda_launch.py and packs every launch for cuLaunchKernel against the compiled kernels, as
    CudaKernels.run does before its driver call. The plans themselves are executed for real by
    tests/test_plugin_plans.py (Triton interpreter) and on a GPU by `make gpu-check`."""

    def __init__(self, folder: Path):
        self.folder, self.calls = folder, []

    def run(self, plan, addresses, workspace, stream):
        from trt_plugins.cuda_launch import address_resolver, pack_arguments

        address_of = address_resolver(plan, addresses, workspace)
        for launch in plan.launches:
            meta = json.loads((self.folder / f"{launch.config.name}.json").read_text())
            pack_arguments(launch, meta, address_of)
        self.calls.append((plan, addresses, workspace, stream))


@pytest.fixture(scope="module")
def compiled_sm87(tmp_path_factory):
    out = tmp_path_factory.mktemp("k") / "kernels"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([str(Path(sys.executable).with_name("cpm-edge")), "kernels", "compile", "--target", "sm_87",
                    "--out", str(out)], check=True, capture_output=True, env=env)
    return out / "sm_87"


@pytest.mark.parametrize("sparse", [False, True])
def test_plugin_enqueue_runs_the_plan_the_tests_execute(sparse, compiled_sm87, monkeypatch):
    """CpmAttention's enqueue builds plans.attention_plan from TensorRT's tensor descriptions and hands it
    with TensorRT's pointers to the GPU executor; every launch packs against a compiled sm_87 kernel."""
    from trt_plugins import names, plans
    from trt_plugins import tensorrt_plugins as tp
    from trt_plugins.attention.config import InfLLMv2Config

    recorder = RecordingExecutor(compiled_sm87)
    monkeypatch.setattr(tp, "gpu_kernels", lambda: recorder)
    attention_cls, ternary_cls, *_ = (c.PLUGIN for c in tp.build_plugin_classes(trt))
    cfg = InfLLMv2Config() if sparse else None
    plugin = attention_cls(names.attention_attrs(16, 2, 64, cfg))
    desc = lambda dims, dtype: SimpleNamespace(dims=dims, type=dtype)  # noqa: E731
    half, i64, f32 = trt.DataType.HALF, trt.DataType.INT64, trt.DataType.FLOAT
    B, T, S = 1, 600, 16384
    NK = plans.n_kernels(InfLLMv2Config(), S)
    descs = [desc((B, T, 16 * 64), half), desc((B, T, 2 * 64), half), desc((B, T, 2 * 64), half),
             desc((B, 2, S, 64), half), desc((B, 2, S, 64), half), desc((B, T), i64)]
    pointers = [256 * (i + 1) for i in range(len(descs) + sparse)]
    plugin.enqueue(descs + ([desc((B, 2, NK, 64), f32)] if sparse else []), [], pointers, [9 * 256], 1 << 30, 77)
    plan, addresses, workspace, stream = recorder.calls[-1]
    assert plan == plans.attention_plan(plans.AttentionShape(B, T, 16, 2, S, 64, NK if sparse else -1), "fp16", cfg)
    assert addresses["q"] == 256 and addresses["positions"] == 6 * 256 and addresses["out"] == 9 * 256
    assert (workspace, stream) == (1 << 30, 77)
    kinds = [launch.config.kernel.rsplit("_kernel", 1)[0] for launch in plan.launches]
    if sparse:  # compression of the new kernels, then per chunk of 256 tokens stage 1, selection, attention
        assert kinds == ["cache_write"] * 2 + ["compress_keys"] + ["stage1_scores", "select_blocks", "block_attention"] * 3
        assert addresses["kc"] == 7 * 256 and plan.workspace_bytes > 0
    else:
        assert kinds == ["cache_write"] * 2 + ["block_attention"] and plan.workspace_bytes == 0
    ternary = ternary_cls({"in_features": 4096, "out_features": 1024, "group_size": 0})
    ternary.enqueue([desc((1, 1, 4096), half), desc((1024, 1024), trt.DataType.INT8), desc((1024, 1), f32)],
                    [], [256, 512, 768], [1024], 0, 0)
    assert recorder.calls[-1][0] == plans.ternary_plan(1, 1024, 4096, 1024, 1, 0, "fp16")


def test_prefill_profile_stops_at_the_prefill_chunk():
    """The engine's prefill profile takes at most the bundle's prefill_chunk tokens a call (TensorRT plans
    activations for the largest shape); decode keeps every row; the state keeps its full shape."""
    state = [{"input": "past_key_0", "output": "present_key_0", "shape": [2, 4096, 64], "dtype": "fp16"},
             {"input": "past_ckey_0", "output": "present_ckey_0", "shape": [2, 255, 64], "dtype": "fp32"}]
    prefill, decode = EngineShapes.from_export({"max_seq": 4096, "state": state}, 4, 512).profiles()
    assert prefill["input_ids"] == ((1, 1), (1, 512), (1, 512)) and decode["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert prefill["past_ckey_0"][2] == (1, 2, 255, 64) and decode["past_key_0"][2] == (4, 2, 4096, 64)
    whole, _ = EngineShapes.from_export({"max_seq": 300, "state": state}, 4).profiles()
    assert whole["input_ids"][2] == (1, 300)
