"""export/onnx_rewrite.py: the rewritten portable graph against the graph the export wrote, both run by ONNX
Runtime through the kit's backend (prefill, chunked prefill, batched decode at different lengths)."""
from __future__ import annotations

import collections
import json
import random
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.onnxruntime_backend import OnnxRuntimeBackend
from export import onnx_rewrite
from export.onnx_export import ExportOptions, export
from export.onnx_rewrite import RewriteError, rewrite_export, rewrite_model
from export.tiny import write_tiny

MAX_SEQ = 256
# fp32: the fused kernels sum in other orders and the residual scalar moves into the weights; 1e-4 of the
# largest logit is the export's own contract (tests/test_export.py).
REL_TOL = 1e-4
DECODE_STEPS = 6
# variant -> (tiny model, --weights, layers). Two layers where a test looks at one layer against the next; the
# sparse and ternary graphs with one (their export is the slowest; ternary's graph is dense's with other numbers).
VARIANTS = {"dense": ("dense", "float", 2), "sparse": ("sparse", "float", 1), "ternary": ("ternary", "float", 1),
            "int4": ("dense", "int4", 2), "minicpm5": ("minicpm5", "float", 2)}


@pytest.fixture(scope="module")
def pairs(tiny_models, tmp_path_factory):
    """variant -> (the export, a rewritten copy, the summary); each exported on first use."""
    root = tmp_path_factory.mktemp("rewrite")
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model, weights, layers = VARIANTS[variant]
            folder = tiny_models[model] if layers == 2 else \
                write_tiny(root / f"{variant}-hf", model, seed=11, num_hidden_layers=layers)
            original = export(ExportOptions(folder, root / variant, "portable", "fp32", MAX_SEQ, weights=weights,
                                               rewrite=False))
            copy = shutil.copytree(original, root / f"{variant}-rewritten")
            cache[variant] = original, Path(copy), rewrite_export(Path(copy))
        return cache[variant]
    return get


def run_both(a: Path, b: Path, sparse: bool):
    """Greedy decoding of two rows in both graphs: row 0 prefilled in two chunks, row 1 shorter, then batched
    decode steps. Returns (worst relative logit difference, tokens of a, tokens of b)."""
    ba, bb = OnnxRuntimeBackend(a, max_batch=2), OnnxRuntimeBackend(b, max_batch=2)
    n = random.randint(140, 200) if sparse else random.randint(12, 60)  # sparse: past the tiny dense_len 128
    prompts = [[1] + [random.randrange(3, 500) for _ in range(n)],
               [1] + [random.randrange(3, 500) for _ in range(n // 2)]]
    worst, first = 0.0, []
    cut = random.randint(2, len(prompts[0]) - 2)
    for row, ids in enumerate(prompts):
        chunks = [(ids[:cut], 0), (ids[cut:], cut)] if row == 0 else [(ids, 0)]
        for chunk, start in chunks:
            la, lb = ba.prefill(row, np.array(chunk), start), bb.prefill(row, np.array(chunk), start)
            worst = max(worst, float(np.abs(la - lb).max() / np.abs(la).max()))
        first.append((int(la.argmax()), int(lb.argmax())))
    ta, tb = [[f[0]] for f in first], [[f[1]] for f in first]
    pos = np.array([len(p) for p in prompts])
    for _ in range(DECODE_STEPS):
        la = ba.decode(np.array([t[-1] for t in ta]), pos)
        lb = bb.decode(np.array([t[-1] for t in tb]), pos)
        worst = max(worst, float((np.abs(la - lb).max(axis=1) / np.abs(la).max(axis=1)).max()))
        for row in range(2):
            ta[row].append(int(la[row].argmax()))
            tb[row].append(int(lb[row].argmax()))
        pos += 1
    return worst, ta, tb


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rewritten_graph_runs_the_same_model(variant, pairs, seed):
    original, rewritten, summary = pairs(variant)
    worst, ta, tb = run_both(original, rewritten, sparse=variant == "sparse")
    assert worst <= REL_TOL
    assert ta == tb


def gqa_nodes(model):
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def attr(node, name, default=None):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_expected_fusions_happened(variant, pairs):
    original, rewritten, summary = pairs(variant)
    info = json.loads((rewritten / "export.json").read_text())
    model = onnx.load(str(rewritten / "model.onnx"))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers, heads, kv_heads, d = info["num_layers"], 4, 2, info["head_dim"]
    proj = "MatMulNBits" if variant == "int4" else "MatMul"

    assert info["rewrite"]["fusions"] == summary["fusions"]
    assert summary["nodes_after"] == len(model.graph.node) < summary["nodes_before"]
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers - 1  # every norm that follows a residual Add
    assert ops["SimplifiedLayerNormalization"] == 2  # layer 0's input norm and the final one (after a Slice)
    assert ops["Pow"] == ops["Reciprocal"] == ops["Sqrt"] == 0
    assert ops[proj] == 4 * layers + (0 if variant == "int4" else 1)  # qkv, o, gate_up, down (+ lm_head)
    fusions = summary["fusions"]
    assert fusions["qkv"] == fusions["gate_up"] == fusions["gqa_out"] == layers
    assert fusions["residual"] == (0 if variant == "minicpm5" else 2 * layers)  # MiniCPM5: no muP scalar
    for gqa in gqa_nodes(model):
        if variant == "sparse":  # the rotated q/k also feed InfLLM v2's selection: RoPE stays, Split feeds it
            assert not attr(gqa, "do_rotary", 0) and gqa.input[10]
            split = producer[gqa.input[2]]  # v: Reshape <- Reshape <- Split
            while split.op_type == "Reshape":
                split = producer[split.input[0]]
            assert split.op_type == "Split" and producer[split.input[0]].op_type == proj
        else:
            assert attr(gqa, "do_rotary") == 1 and attr(gqa, "rotary_interleaved") == 0
            assert gqa.input[1] == gqa.input[2] == ""  # packed q, k, v from one projection
            fused = producer[gqa.input[0]]
            width = (heads + 2 * kv_heads) * d
            assert fused.op_type == proj
            assert (attr(fused, "N") if proj == "MatMulNBits" else inits[fused.input[1]].shape[1]) == width
            assert inits[gqa.input[7]].shape == inits[gqa.input[8]].shape == (MAX_SEQ, d // 2)
    if variant == "sparse":
        assert fusions["rotary"] == 0 and "rotary" in " ".join(summary["skipped"])
    else:
        assert fusions["rotary"] == layers and ops["GatherND"] == 0  # the RoPE tables are read by the op only


def test_inexact_patterns_are_left_alone(pairs, tmp_path, seed):
    """A perturbed export: layer 0's RoPE on q uses x1 sin (not x2 sin), one norm squares with exponent 3 (a
    different model, but a valid graph). Those layers keep their nodes, the others are fused, and the
    rewritten graph computes what the perturbed one does."""
    original, _, _ = pairs("dense")
    model = onnx.load(str(original / "model.onnx"))
    first_gqa = gqa_nodes(model)[0]
    producer = {o: n for n in model.graph.node for o in n.output}
    cat = producer[producer[first_gqa.input[0]].input[0]]
    sub = producer[cat.input[0]]
    x2_sin, split = producer[sub.input[1]], producer[producer[sub.input[0]].input[0]]
    x2_sin.input[list(x2_sin.input).index(split.output[1])] = split.output[0]
    pow_ = [n for n in model.graph.node if n.op_type == "Pow"][1]
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    model.graph.initializer.append(three)
    pow_.input[1] = "three"
    perturbed = shutil.copytree(original, tmp_path / "perturbed")
    onnx.save_model(model, str(perturbed / "model.onnx"))
    rewritten = shutil.copytree(perturbed, tmp_path / "rewritten")
    assert onnx_rewrite.main([str(rewritten)]) == 0
    out = onnx.load(str(rewritten / "model.onnx"))
    ops = collections.Counter(n.op_type for n in out.graph.node)
    summary = json.loads((rewritten / "export.json").read_text())["rewrite"]
    assert summary["fusions"]["qkv"] == summary["fusions"]["rotary"] == 1
    assert ops["Pow"] == ops["Reciprocal"] == 1  # the cubed norm is not an RMSNorm
    kept = [n for n in gqa_nodes(out) if n.name == first_gqa.name][0]
    assert kept.input[:3] == first_gqa.input[:3] and not attr(kept, "do_rotary", 0)
    worst, ta, tb = run_both(perturbed, rewritten, sparse=False)
    assert worst <= REL_TOL and ta == tb


def test_graph_without_the_patterns_is_unchanged():
    """Near misses of every pattern in a hand-built graph: nothing is rewritten, byte for byte."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "w1": rng.standard_normal((8, 8), dtype=np.float32), "w2": rng.standard_normal((8, 8), dtype=np.float32),
        "w3": rng.standard_normal((4, 8), dtype=np.float32), "c": np.array(0.5, np.float32),
        "two": np.array(2.0, np.float32), "axes": np.array([0], np.int64), "eps": np.array(1e-5, np.float32),
        "gamma": np.ones(8, np.float32)}.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Mul", ["m1", "c"], ["s1"]),
        helper.make_node("Sub", ["x", "s1"], ["r1"]),  # a scaled branch into Sub, not a residual Add
        helper.make_node("Pow", ["r1", "two"], ["p"]),
        helper.make_node("ReduceMean", ["p", "axes"], ["mean"]),  # over axis 0, not the last one
        helper.make_node("Add", ["mean", "eps"], ["ae"]),
        helper.make_node("Sqrt", ["ae"], ["sq"]),
        helper.make_node("Reciprocal", ["sq"], ["rc"]),
        helper.make_node("Mul", ["r1", "rc"], ["n1"]),
        helper.make_node("Mul", ["n1", "gamma"], ["n2"]),
        helper.make_node("MatMul", ["n2", "w1"], ["g"]),
        helper.make_node("MatMul", ["x", "w2"], ["u"]),  # up reads another input than gate
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["silu"]),
        helper.make_node("Mul", ["silu", "u"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "near_misses", [helper.make_tensor_value_info("x", f, [4, 8])],
                              [helper.make_tensor_value_info("y", f, [4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    before = model.SerializeToString()
    _, summary = rewrite_model(model)
    assert not any(summary["fusions"].values())
    assert model.SerializeToString() == before


def test_external_weights_are_rewritten_in_place(pairs, tmp_path, monkeypatch):
    """A graph whose weights live in model.onnx.data (large models): the data file is replaced with the graph.
    The size rule (EXTERNAL_DATA_BYTES, 512 MiB, as the export's) is set to 0 so a tiny model takes the
    large-model path; the rewrite itself and ONNX Runtime reading the result are real. The 0.5B-shaped
    export of `make bench-cpu` (1.9 GB external) goes through the same path at the real threshold."""
    original, rewritten, _ = pairs("minicpm5")
    folder = shutil.copytree(original, tmp_path / "external")
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    monkeypatch.setattr(onnx_rewrite, "EXTERNAL_DATA_BYTES", 0)
    rewrite_export(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([p.name for p in rewritten.iterdir()] +
                                                              ["model.onnx.data"])
    a = OnnxRuntimeBackend(rewritten).prefill(0, np.arange(1, 30))
    b = OnnxRuntimeBackend(folder).prefill(0, np.arange(1, 30))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", ["missing", "trt", "twice"])
def test_bad_folder(case, pairs, tmp_path, capsys):
    folder = tmp_path / "e"
    if case == "trt":  # what the pass reads to tell a flavor: export.json
        folder = shutil.copytree(pairs("dense")[0], folder)
        info = json.loads((folder / "export.json").read_text())
        (folder / "export.json").write_text(json.dumps(dict(info, flavor="trt")))
        needle = "flavor 'trt'"
    elif case == "twice":
        folder, needle = pairs("dense")[1], "already rewritten"
    else:
        needle = "not found"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}
    with pytest.raises(RewriteError, match=needle):
        rewrite_export(folder)
    assert onnx_rewrite.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert ({p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}) == before
