"""TensorRT-RTX builds engines from the trt-flavor graphs of the three tiny models with the kit's plugins
(no GPU needed), and the plugins' kernel launches match the kernels compiled ahead of time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from export.onnx_export import ExportOptions, export

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")

BUILD_SCRIPT = """
import json, sys
from pathlib import Path
from trt_plugins.engine_builder import EngineShapes, build_engine
info = json.loads(Path(sys.argv[1], "export.json").read_text())
shapes = EngineShapes(2, info["max_seq"], info["num_kv_heads"], info["head_dim"], info["inputs"][2:])
blob, meta = build_engine(Path(sys.argv[1], "model.onnx"), shapes, "tensorrt-rtx")
Path(sys.argv[2]).write_bytes(blob)
print(json.dumps(meta))
"""


@pytest.mark.parametrize("variant", ["dense", "sparse", "ternary"])
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


class FakeLibrary:
    """Stands in for the pycuda kernel library: checks every launch against the AOT report."""

    def __init__(self, folder: Path):
        self.folder, self.launches = folder, []

    def find(self, prefix, suffix):
        names = sorted(p.stem for p in self.folder.glob(f"{prefix}*{suffix}.json"))
        assert names, (prefix, suffix)
        return names[0]

    def launch(self, config, grid, args, stream):
        meta = json.loads((self.folder / f"{config}.json").read_text())
        assert len(args) == len(meta["args"]), (config, len(args), meta["args"])
        self.launches.append((config, grid))


@pytest.fixture(scope="module")
def compiled_sm87(tmp_path_factory):
    out = tmp_path_factory.mktemp("k") / "kernels"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([str(Path(sys.executable).with_name("cpm-edge")), "kernels", "compile", "--target", "sm_87",
                    "--out", str(out)], check=True, capture_output=True, env=env)
    return out / "sm_87"


def test_plugin_launches_match_compiled_kernels(compiled_sm87, monkeypatch):
    from trt_plugins import tensorrt_plugins as tp

    fake = FakeLibrary(compiled_sm87)
    monkeypatch.setattr(tp, "kernel_library", lambda: fake)
    attention_cls, ternary_cls = (c.PLUGIN for c in tp.build_plugin_classes(trt))
    from trt_plugins import ops
    attention = attention_cls(ops.attention_attrs(32, 2, 128, None))
    desc = lambda dims, dtype: SimpleNamespace(dims=dims, type=dtype)  # noqa: E731
    half, i64 = trt.DataType.HALF, trt.DataType.INT64
    B, T, S = 3, 1, 1024
    attention.enqueue([desc((B, T, 32 * 128), half), desc((B, T, 2 * 128), half), desc((B, T, 2 * 128), half),
                       desc((B, 2, S, 128), half), desc((B, 2, S, 128), half), desc((B, T), i64)],
                      [], [1, 2, 3, 4, 5, 6], [7, 4, 5], 0, 0)
    assert [c for c, _ in fake.launches] == ["cache_write_kernel_fp16_head_dim128"] * 2 + \
        ["block_attention_kernel_fp16_group16_head_dim128_block_n64_dense1"]
    ternary = ternary_cls({"in_features": 4096, "out_features": 1024, "group_size": 0})
    ternary.enqueue([desc((1, 1, 4096), half), desc((1024, 1024), trt.DataType.INT8), desc((1024, 1), trt.DataType.FLOAT)],
                    [], [1, 2, 3], [4], 0, 0)
    assert fake.launches[-1] == ("ternary_matmul_kernel_fp16_group0_block_m16_block_n64", (16, 1))


def test_sparse_plugin_launches_the_whole_selection(compiled_sm87, monkeypatch):
    """A long prefill of an InfLLM v2 layer: compression once, then per chunk of 256 tokens stage 1,
    selection and block-sparse attention, every launch matching a compiled kernel's arguments."""
    from trt_plugins import names
    from trt_plugins import tensorrt_plugins as tp
    from trt_plugins.attention.config import InfLLMv2Config

    fake = FakeLibrary(compiled_sm87)
    monkeypatch.setattr(tp, "kernel_library", lambda: fake)
    attention_cls = tp.build_plugin_classes(trt)[0].PLUGIN
    plugin = attention_cls(names.attention_attrs(16, 2, 64, InfLLMv2Config()))
    desc = lambda dims, dtype: SimpleNamespace(dims=dims, type=dtype)  # noqa: E731
    half, i64 = trt.DataType.HALF, trt.DataType.INT64
    T, S = 600, 16384
    plugin.enqueue([desc((1, T, 16 * 64), half), desc((1, T, 2 * 64), half), desc((1, T, 2 * 64), half),
                    desc((1, 2, S, 64), half), desc((1, 2, S, 64), half), desc((1, T), i64)],
                   [], [1, 2, 3, 4, 5, 6], [7, 4, 5], 1 << 20, 0)
    kinds = [c.rsplit("_kernel", 1)[0] for c, _ in fake.launches]
    assert kinds == ["cache_write"] * 2 + ["compress_keys"] + ["stage1_scores", "select_blocks", "block_attention"] * 3
    assert fake.launches[4][0] == "select_blocks_kernel_fp32_ratio4_nb_pad256"  # 16384 / 64 blocks
    assert [grid for c, grid in fake.launches if c.startswith("block_attention")] == [(256, 2), (256, 2), (88, 2)]
    ws = tp.sparse_buffers(InfLLMv2Config(), 1, 2, S, 64)
    assert ws[0] == 2 * 1023 * 64 * 4 and all(size % 256 == 0 for size in ws)
