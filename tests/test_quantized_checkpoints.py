"""4-bit checkpoints as GPTQ and AutoAWQ publish them: loaded into the kit's layout, run in torch and in
ONNX Runtime (MatMulNBits), and quantize-at-export.

The checkpoints are made here by packers transcribed from the formats' own code (auto-gptq's
QuantLinear.pack in qlinear_cuda.py, gptqmodel's v2 zero points, AutoAWQ's WQLinear_GEMM.from_linear): they
are the independent expectation, not the kit's unpacker. The expected logits come from an fp32 model given
the dequantized weights directly.
"""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from agent.generation import SamplingParams, generate
from agent.onnxruntime_backend import OnnxRuntimeBackend
from agent.tokenizer import Tokenizer
from export.checkpoint import CheckpointError, hf_state_dict, load_model, save_weights
from export.onnx_export import ExportOptions, export
from export.quantized import Int4Linear, quantize_model, read_quant_config
from export.torch_backend import TorchBackend
from export.transforms import use_sparse_attention

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_SEQ = 256
# Both sides fp32 from the same dequantized weights; only the matmul's summation order differs.
REL_TOL_TORCH = 1e-5
# ONNX Runtime's MatMulNBits dequantizes block by block and fuses differently: 1e-4 of the largest logit.
REL_TOL_ORT = 1e-4


# --- the formats' own packers ----------------------------------------------------------------------
def gptq_quantize(w: torch.Tensor, group: int, sym: bool, g_idx: torch.Tensor):
    """GPTQ's min-max quantizer per group (the groups g_idx names): scales, zeros (N, G); dequantized W."""
    N, K = w.shape
    G = K // group
    scales, zeros = torch.empty(N, G), torch.empty(N, G)
    for j in range(G):
        cols = w[:, g_idx == j]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        s = ((hi - lo) / 15).clamp(min=1e-6).half().float()  # fp16 scales, as saved
        scales[:, j] = s
        zeros[:, j] = torch.full_like(s, 8) if sym else torch.round(-lo / s).clamp(0, 15)
    q = torch.clamp(torch.round(w / scales[:, g_idx]) + zeros[:, g_idx], 0, 15)
    return scales, zeros, (q - zeros[:, g_idx]) * scales[:, g_idx]


def autogptq_pack(W, scales, zeros, g_idx, v1: bool):
    """auto-gptq QuantLinear.pack (4 bits): scales, zeros given (N, G); W the dequantized (N, K) weight."""
    scales, zeros = scales.t().contiguous(), zeros.t().contiguous()
    scale_zeros = zeros * scales
    intweight = torch.cat([torch.round((W[:, idx] + scale_zeros[g_idx[idx]]) / scales[g_idx[idx]])
                           .to(torch.int)[:, None] for idx in range(W.shape[1])], dim=1)
    intweight = intweight.t().contiguous().numpy().astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * 4, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    if v1:
        zeros = zeros - 1  # GPTQ v1 stores zero - 1; gptqmodel's gptq_v2 stores the zero itself
    zeros = zeros.numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * 4), dtype=np.uint32)
    i = col = 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= zeros[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return {"qweight": torch.from_numpy(qweight.astype(np.int32)), "qzeros": torch.from_numpy(qzeros.astype(np.int32)),
            "scales": scales.half(), "g_idx": g_idx.to(torch.int32)}


def awq_quantize(w: torch.Tensor, group: int):
    """AutoAWQ's pseudo_quantize_tensor (zero point, no activation scaling): scales, zeros (N, G); W dequantized."""
    N, K = w.shape
    g = w.reshape(-1, group)
    hi, lo = g.amax(1, keepdim=True), g.amin(1, keepdim=True)
    scales = ((hi - lo).clamp(min=1e-5) / 15).half().float()
    zeros = (-torch.round(lo / scales)).clamp(0, 15)
    deq = (torch.clamp(torch.round(g / scales) + zeros, 0, 15) - zeros) * scales
    return scales.view(N, -1), zeros.view(N, -1), deq.reshape(N, K)


def autoawq_pack(W, scales, zeros, group: int):
    """AutoAWQ WQLinear_GEMM.from_linear (4 bits); scales, zeros arrive (G, N) as AutoAWQ's quantizer passes them."""
    scale_zeros = zeros * scales
    scales_h = scales.clone().half()
    pack_num = 8
    intweight = torch.cat([torch.round((W[:, idx] + scale_zeros[idx // group]) / scales_h[idx // group])
                           .to(torch.int)[:, None] for idx in range(W.shape[1])], dim=1)
    intweight = intweight.t().contiguous().to(torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * 4), dtype=torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(intweight.shape[1] // pack_num):
        for i in range(pack_num):
            qweight[:, col] |= intweight[:, col * pack_num + order_map[i]] << (i * 4)
    zeros = zeros.to(torch.int32)
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 32 * 4), dtype=torch.int32)
    for col in range(zeros.shape[1] // pack_num):
        for i in range(pack_num):
            qzeros[:, col] |= zeros[:, col * pack_num + order_map[i]] << (i * 4)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales_h}


# --- tiny quantized folders ------------------------------------------------------------------------
def write_quantized(base, out, method: str, group: int, sym=True, desc_act=False, fmt="gptq",
                    config_file="config.json", extra=None):
    """Quantize base's projections in the given format into a new folder; returns (folder, {hf name: deq W})."""
    shutil.copytree(base, out)
    model = load_model(base)
    state = hf_state_dict(model)
    dequantized = {}
    for name in list(state):
        if name.split(".")[-2] not in PROJ:
            continue
        w = state.pop(name).float()
        prefix = name[: -len(".weight")]
        N, K = w.shape
        g = K if group == -1 else group
        if method == "gptq":
            g_idx = torch.arange(K) // g
            if desc_act:
                perm = torch.randperm(K)  # GPTQ act-order: group of input perm[i] is i // g
                g_idx = torch.empty(K, dtype=torch.int64)
                g_idx[perm] = torch.arange(K) // g
            scales, zeros, deq = gptq_quantize(w, g, sym, g_idx)
            packed = autogptq_pack(deq, scales, zeros, g_idx, v1=fmt == "gptq")
        else:
            scales, zeros, deq = awq_quantize(w, g)
            packed = autoawq_pack(deq, scales.t().contiguous(), zeros.t().contiguous(), g)
        dequantized[name] = deq
        state.update({f"{prefix}.{k}": v for k, v in packed.items()})
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_weights({k: v.contiguous() for k, v in state.items()}, out)
    if method == "gptq":
        qc = {"bits": 4, "group_size": group, "sym": sym, "desc_act": desc_act, "checkpoint_format": fmt}
        if config_file == "config.json":
            qc["quant_method"] = "gptq"
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    qc.update(extra or {})
    if config_file == "config.json":
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = qc
        (out / "config.json").write_text(json.dumps(config))
    else:
        (out / config_file).write_text(json.dumps(qc))
    return out, dequantized


def reference_model(base, dequantized):
    """The fp32 model with the dequantized weights assigned as plain nn.Linear weights."""
    model = load_model(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in dequantized.items():
            params[name.removeprefix("model.")].copy_(w)
    return model


def logits_of(model, ids):
    model.setup_cache(ids.shape[0], ids.shape[1])
    with torch.inference_mode():
        return model(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1))


@pytest.fixture(scope="module")
def base(tiny_models):
    return tiny_models["dense"]


CASES = {
    "gptq-v1-sym-g32": dict(method="gptq", group=32, config_file="quantize_config.json"),
    "gptq-v1-sym-g128-desc_act": dict(method="gptq", group=128, desc_act=True),
    "gptq-v1-asym-g128": dict(method="gptq", group=128, sym=False),
    "gptq_v2-asym-g32-desc_act": dict(method="gptq", group=32, sym=False, desc_act=True, fmt="gptq_v2"),
    "gptq-per-channel": dict(method="gptq", group=-1),
    "awq-gemm-g128": dict(method="awq", group=128),
    "awq-gemm-g32-quant_config": dict(method="awq", group=32, config_file="quant_config.json"),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_the_dequantized_fp32_model(case, base, tmp_path, seed):
    folder, deq = write_quantized(base, tmp_path / case, **CASES[case])
    model = load_model(folder)
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 2 * len(PROJ)
    assert any(m.perm is not None for m in layers) == CASES[case].get("desc_act", False)
    ids = torch.randint(3, 500, (2, random.randint(5, 40)))
    expected = logits_of(reference_model(base, deq), ids)
    got = logits_of(model, ids)
    assert (got - expected).abs().max() / expected.abs().max() < REL_TOL_TORCH
    assert not torch.allclose(expected, logits_of(load_model(base), ids), rtol=0, atol=1e-3)  # it is quantized


def greedy(backend, folder, prompts, n=24):
    params = [SamplingParams(max_tokens=n)] * len(prompts)
    return [r.token_ids for r in generate(backend, Tokenizer(folder), prompts, params)]


@pytest.mark.parametrize("case", ["gptq_v2-asym-g32-desc_act", "awq-gemm-g128"])
def test_portable_export_onnxruntime_agrees(case, base, tmp_path, seed):
    folder, _ = write_quantized(base, tmp_path / case, **CASES[case])
    out = export(ExportOptions(folder, tmp_path / "export", "portable", "fp32", MAX_SEQ))
    info = json.loads((out / "export.json").read_text())
    assert info["weights"]["format"] == "int4" and info["weights"]["layers"] == 2 * len(PROJ)
    assert info["weights"]["zero_points"] and info["weights"]["act_order"] == CASES[case].get("desc_act", False)
    import onnx
    graph = onnx.load(str(out / "model.onnx"))
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    fused = info["rewrite"]["fusions"]  # export's default rewrite: q/k/v become one node, gate/up one
    assert len(nodes) == 2 * len(PROJ) - 2 * fused["qkv"] - fused["gate_up"]
    prompts = [[1] + [random.randrange(3, 500) for _ in range(random.randint(8, 40))] for _ in range(2)]
    ort, ref = OnnxRuntimeBackend(out, max_batch=2), TorchBackend(load_model(folder), 2, MAX_SEQ)
    a, b = ort.prefill(0, np.asarray(prompts[0])), ref.prefill(0, np.asarray(prompts[0]))
    assert np.abs(a - b).max() / np.abs(b).max() < REL_TOL_ORT
    assert greedy(ort, out, prompts) == greedy(ref, folder, prompts)  # generation prefills every row again


@pytest.mark.parametrize("variant", ["sparse"])
def test_quantize_at_export_tokens_identical(variant, tiny_models, tmp_path, seed):
    path = tiny_models[variant]
    group = random.choice([32, 64, 128])
    out = export(ExportOptions(path, tmp_path / "export", "portable", "fp32", MAX_SEQ, weights="int4",
                               group_size=group))
    info = json.loads((out / "export.json").read_text())
    assert info["weights"] == {"format": "int4", "bits": 4, "source": ["rtn"], "group_size": [group],
                               "zero_points": False, "act_order": False, "layers": 2 * len(PROJ),
                               "activations": "float"}
    n = random.randint(140, 200)  # past the tiny sparse dense_len of 128
    prompts = [[1] + [random.randrange(3, 500) for _ in range(m)] for m in (n, n // 2)]
    model = quantize_model(load_model(path), group)
    use_sparse_attention(model)
    assert greedy(OnnxRuntimeBackend(out, max_batch=2), out, prompts, n=12) == greedy(
        TorchBackend(model, 2, MAX_SEQ), out, prompts, n=12)


def test_int8_activations_are_onnxruntime_s_accuracy_level_4(tiny_models, tmp_path, seed):
    """--int4-activations int8: every MatMulNBits carries accuracy_level 4 (float: 0), the logits move a little
    from the float-activation export's (ONNX Runtime now rounds them; they are not equal) and stay close;
    the trt flavor and float weights refuse it in one line."""
    import onnx

    group = random.choice([32, 64, 128])
    outs = {act: export(ExportOptions(tiny_models["dense"], tmp_path / act, "portable", "fp32", MAX_SEQ,
                                      weights="int4", group_size=group, int4_activations=act))
            for act in ("float", "int8")}
    for act, level in (("float", 0), ("int8", 4)):
        assert json.loads((outs[act] / "export.json").read_text())["weights"]["activations"] == act
        nodes = [n for n in onnx.load(str(outs[act] / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
        assert nodes and {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute
                          if a.name == "accuracy_level"} == {level}
    ids = np.asarray([1] + [random.randrange(3, 500) for _ in range(random.randint(8, 60))])
    a, b = (OnnxRuntimeBackend(outs[act], max_batch=1).prefill(0, ids) for act in ("float", "int8"))
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 1e-6 < rel < 1e-2, rel
    for flavor, weights, message in (("trt", "int4", "for the portable flavor"),
                                     ("portable", "float", "the projections are not int4")):
        with pytest.raises(CheckpointError, match=message) as e:
            export(ExportOptions(tiny_models["dense"], tmp_path / "x", flavor, "fp32", MAX_SEQ, weights=weights,
                                 int4_activations="int8"))
        assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "key 'bits' is 8; only 4-bit"),
    ({"quant_method": "bitnet", "bits": 4}, "key 'quant_method' is 'bitnet'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "key 'version' is 'gemv'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "key 'checkpoint_format' is 'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 48}, "key 'group_size' is 48"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "pack_dtype": "int64"}, "key 'pack_dtype' is 'int64'"),
])
def test_unsupported_settings_are_refused_in_one_line(qc, message, base, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(CheckpointError, match=message) as e:
        read_quant_config(folder)
    assert "quantization_config" in str(e.value) and "\n" not in str(e.value)


def test_gptq_v1_zero_point_16_and_bad_g_idx_are_refused(base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = write_quantized(base, tmp_path / "v1", method="gptq", group=128, sym=False)
    weights = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    weights[f"{name}.qzeros"] = weights[f"{name}.qzeros"] | 0xF  # stored 15: zero point 16
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"'{name}.qzeros' holds zero point 16"):
        load_model(folder)
    weights[f"{name}.qzeros"] = weights[f"{name}.qzeros"] & ~0xF
    weights[f"{name}.g_idx"][-3:] = 0  # group 0 now has more than 128 inputs
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"'{name}.g_idx' does not give every one"):
        load_model(folder)


def test_rtn_logit_error_is_small_and_shrinks_with_the_group(tiny_models, seed):
    """Round-to-nearest int4 moves the logits of a tiny model a little, and less with finer groups."""
    path = tiny_models["dense"]
    ids = torch.randint(3, 500, (2, 30))
    reference = logits_of(load_model(path), ids)
    errors = {}
    for group in (32, 128):
        got = logits_of(quantize_model(load_model(path), group), ids)
        errors[group] = float((got - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())
    assert 0 < errors[32] < errors[128] < 0.3, errors


def test_cli_logits_runs_int4_and_refuses_in_one_line(base, tmp_path, capsys):
    from cli_helpers import run_cli

    folder, _ = write_quantized(base, tmp_path / "gptq", method="gptq", group=64, desc_act=True)
    ids = [1] + [random.randrange(3, 500) for _ in range(12)]
    row = ",".join(map(str, ids))
    for model_dir, extra, expected_model in [(folder, [], lambda: load_model(folder)),
                                             (base, ["--weights", "int4", "--group-size", "32"],
                                              lambda: quantize_model(load_model(base), 32))]:
        code, _, err = run_cli(capsys, "logits", model_dir, "--input-ids", row, "--out", tmp_path / "l.npy", *extra)
        assert code == 0, err
        expected = logits_of(expected_model(), torch.tensor([ids])).numpy()
        assert np.abs(np.load(tmp_path / "l.npy") - expected).max() <= 1e-6 * np.abs(expected).max()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "logits", folder, "--input-ids", row, "--out", tmp_path / "l.npy")
    assert code == 2 and "key 'bits' is 3; only 4-bit weights are supported" in err
    assert len(err.strip().splitlines()) == 1
