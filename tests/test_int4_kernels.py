"""INT4 (W4A16): the Triton GEMV/GEMM against the torch reference in Triton's interpreter, its launch plan
(executed, and as the TensorRT plugin and ONNX Runtime build it), and TensorRT-RTX engines with CpmInt4Gemm
(a small graph of its nodes, and the int4 tiny model exported in the trt flavor)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trt_plugins import ops, plans
from trt_plugins.executors import run_triton
from trt_plugins.int4 import kernels
from trt_plugins.int4.reference import PackedInt4, int4_linear_ref, pack_nibbles
from trt_plugins.plan_traffic import launch_traffic

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp16 outputs: kernel and reference both round one fp32 sum to fp16 (sums in another order: a few fp32
# ulps first), so compare at fp16's resolution of the largest output.
REL_FP16 = 2e-3
# fp32 activations (the ONNX Runtime path): rounding of fp32 sums in another order only.
REL_FP32 = 1e-5
COS_MIN = 0.9999


def random_int4(N: int, K: int, group: int, zeros: bool, dtype=torch.float16, gen=None) -> PackedInt4:
    """Uniformly random codes (every one of the 16 present), zero points and positive or negative scales."""
    codes = torch.randint(0, 16, (N, K), generator=gen)
    codes.view(-1)[:16] = torch.arange(16)
    G = K // group
    zero_points = pack_nibbles(torch.randint(0, 16, (N, G), generator=gen)) if zeros else None
    scales = ((torch.rand(N, G, generator=gen) - 0.3) * 0.05).to(dtype)
    return PackedInt4(pack_nibbles(codes), scales, zero_points, K, group)


def on_device(p: PackedInt4) -> PackedInt4:
    return PackedInt4(p.qweight.to(DEVICE), p.scales.to(DEVICE), None if p.zeros is None else p.zeros.to(DEVICE),
                      p.in_features, p.group_size, None if p.perm is None else p.perm.to(DEVICE))


def assert_matches(got: torch.Tensor, expected: torch.Tensor, rel: float):
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert not torch.isnan(got).any()
    g, e = got.double().cpu(), expected.double().cpu()
    torch.testing.assert_close(g, e, atol=rel * float(e.abs().max()), rtol=0)
    assert float(torch.nn.functional.cosine_similarity(g.flatten(), e.flatten(), dim=0)) >= COS_MIN


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every torch.empty comes back full of NaN, so an output element the kernel never writes shows."""
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))


# M = 1, 3, 8 take the GEMV tile, 33 the GEMM tile (two M tiles); N is never a multiple of either N tile.
@pytest.mark.parametrize("M", [1, 3, 8, 33])
@pytest.mark.parametrize("group, zeros", [(32, False), (64, True), (128, False), (128, True), (32, True)])
def test_triton_matches_reference_fp16(M, group, zeros, seed, poisoned_outputs):
    N, K = random.choice([33, 70, 97]), group * random.randint(2, 4)
    p = random_int4(N, K, group, zeros)
    x = torch.randn(M, K, dtype=torch.float16)
    got = kernels.int4_linear(x.to(DEVICE), on_device(p))
    assert_matches(got, int4_linear_ref(x, p), REL_FP16)


def test_triton_fp32_batched_rows_and_act_order(seed, poisoned_outputs):
    """(B, T, K) activations in fp32 (what ONNX Runtime runs), with an act-order permutation of the inputs."""
    K = 192
    p = random_int4(45, K, 64, True, torch.float32)
    p.perm = torch.randperm(K)
    x = torch.randn(2, 5, K)
    got = kernels.int4_linear(x.to(DEVICE), on_device(p))
    assert got.shape == (2, 5, 45)
    assert_matches(got, int4_linear_ref(x, p), REL_FP32)


def test_wrapper_refuses_mismatches():
    p = random_int4(16, 64, 32, False)
    with pytest.raises(ValueError, match="x has 32 features"):
        kernels.int4_linear(torch.randn(1, 32, dtype=torch.float16), p)
    with pytest.raises(ValueError, match="scales are torch.float16, x is torch.float32"):
        kernels.int4_linear(torch.randn(1, 64), p)
    with pytest.raises(ValueError, match="group_size 16"):
        plans.int4_plan(1, 16, 64, 16, False, "fp16")


def test_plan_picks_gemv_for_decode_and_gemm_for_prefill():
    for rows in range(1, plans.INT4_GEMV_ROWS + 1):
        launch, = plans.int4_plan(rows, 4096, 4096, 128, False, "fp16").launches
        c = dict(launch.config.constexprs)
        assert (c["BLOCK_M"], c["BLOCK_N"]) == plans.INT4_GEMV_TILE[:2] and launch.grid == (4096 // c["BLOCK_N"], 1, 1)
    launch, = plans.int4_plan(300, 4096, 4096, 128, True, "bf16").launches
    c = dict(launch.config.constexprs)
    assert (c["BLOCK_M"], c["BLOCK_N"]) == plans.INT4_GEMM_TILE[:2] and c["HAS_ZEROS"]
    assert launch.grid == (4096 // c["BLOCK_N"], -(-300 // c["BLOCK_M"]), 1)
    assert c["BLOCK_K"] <= c["GROUP"] and c["GROUP"] % c["BLOCK_K"] == 0  # a step never crosses a group


@pytest.mark.parametrize("zeros", [False, True])
def test_decode_traffic_is_the_plan_buffers(zeros):
    """One decode row reads each weight byte once: the traffic count equals the plan's input buffers."""
    plan = plans.int4_plan(1, 4096, 4096, 128, zeros, "fp16")
    t = launch_traffic(plan.launches[0], np.zeros((1, 1), np.int64))
    x = plan.buffer("x").nbytes
    weights = sum(b.nbytes for b in plan.buffers if b.kind == "input") - x
    assert weights == 4096 * 2048 + 4096 * 32 * 2 + (4096 * 16 if zeros else 0)
    assert t.read == weights + x * plan.launches[0].grid[0] and t.written == plan.buffer("y").nbytes


@pytest.mark.parametrize("rows, zeros", [(1, True), (8, False), (40, True)])
def test_plan_executes_like_the_reference(rows, zeros, seed):
    """The plan the plugin launches, carried out by the Triton executor on the plan's own named buffers."""
    N, K, group = 130, 256, 64
    p = random_int4(N, K, group, zeros)
    x = torch.randn(rows, K, dtype=torch.float16)
    plan = plans.int4_plan(rows, N, K, group, zeros, "fp16")
    tensors = {"x": x, "qweight": p.qweight, "scales": p.scales, "y": torch.full((rows, N), float("nan"),
                                                                                 dtype=torch.float16)}
    if zeros:
        tensors["zeros"] = p.zeros
    tensors = {k: v.to(DEVICE) for k, v in tensors.items()}
    run_triton(plan, tensors)
    assert_matches(tensors["y"], int4_linear_ref(x, p), REL_FP16)


class Int4Layer(torch.nn.Module):
    """One CpmInt4Gemm through the kit's op: the reference when run, the plugin node when exported."""

    def __init__(self, p: PackedInt4):
        super().__init__()
        # int8 views as the buffers: TensorRT widens uint8 initializers, and the exporter cannot trace a view
        self.register_buffer("qweight", p.qweight.view(torch.int8))
        self.register_buffer("scales", p.scales)
        empty = torch.empty(0, dtype=torch.int8)  # symmetric: no zero points
        self.register_buffer("zeros", p.zeros.view(torch.int8) if p.zeros is not None else empty)
        self.in_features, self.group_size = p.in_features, p.group_size

    def forward(self, x):
        return ops.cpm_int4_gemm(x, self.qweight, self.scales, self.zeros, self.in_features, self.group_size)


def export_layers(path, layers: list[PackedInt4], dtype) -> None:
    """A small graph of chained CpmInt4Gemm nodes (x (B, T, K) -> ... -> y) with torch.onnx.export."""
    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Int4Layer(p) for p in layers)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    x = torch.randn(1, 3, layers[0].in_features, dtype=dtype)
    tokens = torch.export.Dim("tokens", min=1, max=256)
    torch.onnx.export(Chain().eval(), (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True,
                      dynamic_shapes={"x": {1: tokens}}, opset_version=18)


def test_eager_op_is_the_reference_and_export_emits_the_plugin_node(tmp_path, seed):
    import onnx

    sym, asym = random_int4(64, 128, 32, False, torch.float32), random_int4(96, 64, 64, True, torch.float32)
    x = torch.randn(2, 128)
    torch.testing.assert_close(Int4Layer(sym)(x), int4_linear_ref(x, sym), atol=0, rtol=0)
    export_layers(tmp_path / "m.onnx", [sym, asym], torch.float32)
    nodes = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == ops.INT4_OP]
    assert [n.domain for n in nodes] == [ops.NAMESPACE] * 2 and [len(n.input) for n in nodes] == [3, 4]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[1].attribute}
    assert attrs["in_features"] == 64 and attrs["out_features"] == 96 and attrs["group_size"] == 64
    assert attrs["has_zeros"] == 1 and attrs["plugin_namespace"] == b"cpm_edge" and attrs["plugin_version"] == b"1"


@pytest.mark.parametrize("mode", ["reference", "interpreter"])
def test_onnxruntime_runs_the_plugin_nodes(mode, tmp_path, seed):
    """The exported graph in ONNX Runtime with its CpmInt4Gemm nodes (one symmetric, one with zero points)
    computed by the torch reference or by the plugin's plan in Triton's interpreter."""
    import onnxruntime as ort

    from trt_plugins import onnxruntime_ops

    sym, asym = random_int4(64, 128, 32, False, torch.float32), random_int4(70, 64, 64, True, torch.float32)
    (tmp_path / "e").mkdir()
    export_layers(tmp_path / "e" / "model.onnx", [sym, asym], torch.float32)
    folder = onnxruntime_ops.graph_for_onnxruntime(tmp_path / "e", tmp_path / "ort")
    session = ort.InferenceSession(str(folder / "model.onnx"), onnxruntime_ops.session_options(mode))
    x = torch.randn(1, 7, 128)
    (y,) = session.run(None, {"x": x.numpy()})
    expected = int4_linear_ref(int4_linear_ref(x, sym), asym)
    assert_matches(torch.from_numpy(y), expected, REL_FP32)


def test_plugin_enqueue_builds_the_plan_the_tests_execute(monkeypatch):
    """CpmInt4Gemm's enqueue makes plans.int4_plan from TensorRT's tensor descriptions and hands it, with
    TensorRT's pointers, to the GPU executor (recorded here: no GPU). What the recorder hides is checked for
    real elsewhere: the same plans run in Triton's interpreter against the reference (this file), and the
    executor's argument packing is compared with each compiled kernel's PTX .param list (tests/test_aot.py);
    the driver launch itself needs a GPU (make gpu-check)."""
    trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    from trt_plugins import tensorrt_plugins as tp

    calls = []
    monkeypatch.setattr(tp, "gpu_kernels", lambda: SimpleNamespace(run=lambda *a: calls.append(a)))
    plugin_cls = next(c.PLUGIN for c in tp.build_plugin_classes(trt) if c.PLUGIN.NAME == ops.INT4_OP)
    desc = lambda dims, dtype: SimpleNamespace(dims=dims, type=dtype)  # noqa: E731
    i8 = trt.DataType.INT8
    for zeros, dtype, name in ((True, trt.DataType.BF16, "bf16"), (False, trt.DataType.HALF, "fp16")):
        plugin = plugin_cls({"in_features": 4096, "out_features": 1024, "group_size": 128, "has_zeros": int(zeros)})
        descs = [desc((2, 5, 4096), dtype), desc((1024, 2048), i8), desc((1024, 32), dtype)]
        descs += [desc((1024, 16), i8)] if zeros else []
        plugin.enqueue(descs, [], [256 * (i + 1) for i in range(len(descs))], [4096], 0, 7)
        plan, addresses, workspace, stream = calls[-1]
        assert plan == plans.int4_plan(10, 1024, 4096, 128, zeros, name) and stream == 7
        assert addresses == {"x": 256, "qweight": 512, "scales": 768, "y": 4096, **({"zeros": 1024} if zeros else {})}
        assert set(addresses) == {b.name for b in plan.buffers}


ENGINE_SCRIPT = """
import json, sys
from trt_plugins.tensorrt_plugins import import_tensorrt, register_plugins
trt = import_tensorrt("rtx")
register_plugins(trt)
logger = trt.Logger(trt.Logger.WARNING)
builder = trt.Builder(logger)
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
parser = trt.OnnxParser(network, logger)
if not parser.parse_from_file(sys.argv[1]):
    sys.exit("; ".join(parser.get_error(i).desc() for i in range(parser.num_errors)))
plugins = [network.get_layer(i).name for i in range(network.num_layers)
           if network.get_layer(i).type == trt.LayerType.PLUGIN_V3]
config = builder.create_builder_config()
profile = builder.create_optimization_profile()
K = network.get_input(0).shape[2]
profile.set_shape("x", (1, 1, K), (1, 8, K), (1, 256, K))
config.add_optimization_profile(profile)
blob = builder.build_serialized_network(network, config)
if blob is None:
    sys.exit("the builder returned no engine")
open(sys.argv[2], "wb").write(bytes(blob))
print(json.dumps({"plugin_layers": len(plugins)}))
"""


def test_tensorrt_rtx_builds_an_engine_with_int4_gemm(tmp_path, seed):
    """A real TensorRT-RTX builder (no GPU needed) parses CpmInt4Gemm nodes (symmetric and with zero points,
    fp16) and builds an engine holding them."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    layers = [random_int4(256, 128, 128, False), random_int4(128, 256, 32, True)]
    export_layers(tmp_path / "m.onnx", layers, torch.float16)
    # A subprocess: a TensorRT build that fails inside a Python plugin can take its process down.
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(tmp_path / "m.onnx"), str(tmp_path / "e.plan")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"plugin_layers": 2' in proc.stdout
    blob = (tmp_path / "e.plan").read_bytes()
    assert len(blob) > 10_000 and blob.count(ops.INT4_OP.encode()) >= 1 and b"cpm_edge" in blob


# --- a tiny MiniCPM4 with int4 projections, exported in the trt flavor (export/quantized.py) ------------
GROUP_TINY = 64  # the tiny model's widths (256, 640) take groups of 32, 64 and 128


@pytest.fixture(scope="module")
def int4_exports(tiny_models, tmp_path_factory):
    from export.onnx_export import ExportOptions, export

    root = tmp_path_factory.mktemp("int4-exports")
    return {dtype: export(ExportOptions(tiny_models["dense"], root / dtype, "trt", dtype, 256, weights="int4",
                                        group_size=GROUP_TINY)) for dtype in ("fp32", "fp16")}


def test_int4_tiny_export_in_the_interpreter_gives_torch_tokens(int4_exports, tiny_models, seed):
    """Every CpmInt4Gemm node of the export carried out by its plan in Triton's interpreter (and attention
    by its own): greedy tokens equal the torch model's with the same round-to-nearest int4 weights."""
    from agent.generation import SamplingParams, generate
    from agent.tokenizer import Tokenizer
    from cli.model_commands import trt_graph_in_onnxruntime
    from export.checkpoint import load_model
    from export.quantized import quantize_model
    from export.torch_backend import TorchBackend

    # two rows batched, a prefill and 3 decode steps each (the interpreter takes ~10 s a step on one core)
    prompts = [[1] + [random.randrange(3, 500) for _ in range(random.randint(4, 8))] for _ in range(2)]
    params = [SamplingParams(max_tokens=3, temperature=0.0)] * 2
    tokenizer = Tokenizer(tiny_models["dense"])
    model = quantize_model(load_model(tiny_models["dense"]), GROUP_TINY)
    expected = generate(TorchBackend(model, max_batch=2, max_seq=256), tokenizer, prompts, params)
    backend = trt_graph_in_onnxruntime(int4_exports["fp32"], "interpreter", max_batch=2)
    got = generate(backend, tokenizer, prompts, params)
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]


TINY_ENGINE_SCRIPT = """
import json, sys
from pathlib import Path
from trt_plugins.engine_builder import EngineShapes, build_engine
info = json.loads(Path(sys.argv[1], "export.json").read_text())
blob, meta = build_engine(Path(sys.argv[1], "model.onnx"), EngineShapes.from_export(info, 2), "tensorrt-rtx")
Path(sys.argv[2]).write_bytes(blob)
print(json.dumps(meta))
"""


def test_tensorrt_rtx_builds_the_int4_tiny_engine(int4_exports, tmp_path):
    """The fp16 trt-flavor export of the int4 tiny model: TensorRT-RTX resolves 7 CpmInt4Gemm per layer
    (plus CpmAttention) and builds the engine."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    proc = subprocess.run([sys.executable, "-c", TINY_ENGINE_SCRIPT, str(int4_exports["fp16"]),
                           str(tmp_path / "e.plan")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["plugin_layers"] == 2 + 14  # attention per layer + 7 projections each, 2 layers
    blob = (tmp_path / "e.plan").read_bytes()
    assert ops.INT4_OP.encode() in blob and b"CpmAttention" in blob
