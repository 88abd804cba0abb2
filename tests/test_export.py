"""ONNX export with KV cache, and the onnxruntime backend that runs it: token for token against torch."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from agent.errors import AgentInputError
from agent.generation import SamplingParams, generate
from agent.onnxruntime_backend import OnnxRuntimeBackend
from agent.tokenizer import Tokenizer
from cli_helpers import run_cli
from export.checkpoint import load_model
from export.onnx_export import ExportOptions, export, model_hash
from export.torch_backend import TorchBackend
from export.transforms import use_sparse_attention

MAX_SEQ = 512
# fp32: ONNX Runtime fuses and reorders the same math; 1e-4 of the largest logit is the contract.
REL_TOL = 1e-4


@pytest.fixture(scope="session")
def exports(tiny_models, tmp_path_factory):
    """{(variant, flavor): export folder} for the three tiny models and both flavors (fp32)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for variant, path in tiny_models.items():
        for flavor in ("portable", "trt"):
            out[variant, flavor] = export(ExportOptions(path, root / f"{variant}-{flavor}", flavor, "fp32", MAX_SEQ))
    return out


def torch_backend(path: Path, max_batch: int) -> TorchBackend:
    model = load_model(path)
    if model.config.sparse is not None:
        use_sparse_attention(model)
    return TorchBackend(model, max_batch=max_batch, max_seq=MAX_SEQ)


def ort_backend(export_dir: Path, flavor: str, max_batch: int, tmp_path: Path) -> OnnxRuntimeBackend:
    if flavor == "portable":
        return OnnxRuntimeBackend(export_dir, max_batch=max_batch)
    from trt_plugins.onnxruntime_ops import graph_for_onnxruntime, session_options
    return OnnxRuntimeBackend(graph_for_onnxruntime(export_dir, tmp_path / "ort"), max_batch=max_batch,
                              session_options=session_options())


def prompts_for(variant: str) -> list[list[int]]:
    n = random.randint(140, 200) if variant == "sparse" else random.randint(8, 40)  # sparse: past dense_len 128
    return [[1] + [random.randrange(3, 500) for _ in range(n)], [1] + [random.randrange(3, 500) for _ in range(n // 2)]]


@pytest.mark.parametrize("flavor", ["portable", "trt"])
@pytest.mark.parametrize("variant", ["dense", "sparse", "ternary", "minicpm5"])
def test_greedy_64_tokens_identical_to_torch(variant, flavor, exports, tiny_models, tmp_path):
    prompts = prompts_for(variant)
    params = [SamplingParams(max_tokens=64) for _ in prompts]
    tokenizer = Tokenizer(exports[variant, flavor])
    ours = generate(ort_backend(exports[variant, flavor], flavor, 2, tmp_path), tokenizer, prompts, params)
    reference = generate(torch_backend(tiny_models[variant], 2), tokenizer, prompts, params)
    for a, b in zip(ours, reference):
        assert a.token_ids == b.token_ids
        assert len(a.token_ids) == 64 or a.finish_reason == "stop"


@pytest.mark.parametrize("variant", ["dense", "sparse"])
def test_all_position_logits_within_1e_4(variant, tiny_models, tmp_path):
    import onnxruntime as ort

    path = export(ExportOptions(tiny_models[variant], tmp_path / "e", "portable", "fp32", MAX_SEQ, all_logits=True))
    T = random.randint(150, 220)
    ids = torch.randint(3, 500, (2, T))
    pos = torch.arange(T).expand(2, -1)
    info = json.loads((path / "export.json").read_text())
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = []
    for b in range(2):  # ONNX Runtime's GroupQueryAttention takes several tokens for one row at a time
        feeds = {"input_ids": ids[b:b + 1].numpy(), "positions": pos[b:b + 1].numpy().copy()}
        for name in info["inputs"][2:]:
            feeds[name] = np.zeros((1, 2, MAX_SEQ, 64), np.float32)
        rows.append(session.run(["logits"], feeds)[0])
    got = np.concatenate(rows)
    model = load_model(tiny_models[variant])
    if model.config.sparse is not None:
        use_sparse_attention(model)
    model.setup_cache(2, MAX_SEQ)
    with torch.inference_mode():
        expected = model(ids, pos).numpy()
    assert got.shape == expected.shape == (2, T, 512)
    assert np.abs(got - expected).max() / np.abs(expected).max() < REL_TOL


def test_decode_writes_the_cache_in_place(exports):
    backend = OnnxRuntimeBackend(exports["dense", "portable"], max_batch=3)
    buffers = [c.ctypes.data for c in backend.caches]
    backend.prefill(1, np.array([1, 5, 6, 7]))
    assert np.abs(backend.caches[0][1, :, :4]).sum() > 0 and not backend.caches[0][1, :, 4:].any()
    assert not backend.caches[0][0].any() and not backend.caches[0][2].any()  # other rows untouched
    backend.decode(np.array([9, 9]), np.array([0, 4]))
    assert np.abs(backend.caches[0][1, :, 4]).sum() > 0
    assert [c.ctypes.data for c in backend.caches] == buffers  # the same memory, written in place


def test_plugin_nodes_carry_what_tensorrt_looks_up(exports):
    from trt_plugins import ops

    dense = onnx.load(str(exports["dense", "trt"] / "model.onnx"))
    ternary = onnx.load(str(exports["ternary", "trt"] / "model.onnx"))
    attention = [n for n in dense.graph.node if n.op_type == ops.ATTENTION_OP]
    assert len(attention) == 2 and all(n.domain == ops.NAMESPACE for n in attention)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attention[0].attribute}
    assert attrs["plugin_version"] == b"1" and attrs["plugin_namespace"] == b"cpm_edge"
    assert attrs["num_heads"] == 4 and attrs["num_kv_heads"] == 2 and attrs["head_dim"] == 64
    gemms = [n for n in ternary.graph.node if n.op_type == ops.TERNARY_OP]
    assert len(gemms) == 2 * 7  # every projection of both layers
    inits = {i.name: i for i in ternary.graph.initializer}
    packed = [inits[n.input[1]] for n in gemms if n.input[1] in inits]
    assert packed and all(p.data_type == onnx.TensorProto.INT8 for p in packed)
    assert {n.op_type for n in onnx.load(str(exports["dense", "portable"] / "model.onnx")).graph.node} \
        .isdisjoint({ops.ATTENTION_OP, ops.TERNARY_OP})


def test_export_json(exports, tiny_models):
    info = json.loads((exports["sparse", "trt"] / "export.json").read_text())
    assert info["model_hash"] == model_hash(tiny_models["sparse"])
    assert (info["flavor"], info["dtype"], info["max_seq"], info["logits"]) == ("trt", "fp32", MAX_SEQ, "last")
    assert info["sparse_config"]["dense_len"] == 128 and info["opsets"]["cpm_edge"] == 1
    assert {"tokenizer.json", "config.json", "model.onnx"} <= {p.name for p in exports["sparse", "trt"].iterdir()}


def test_cli_export_and_generate(tiny_dense, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", tiny_dense, "--out", tmp_path / "e", "--max-seq", "64")
    assert code == 0, err
    assert "export: tracing" in err and "exported portable fp32" in err and "export: rewrite:" in err
    assert json.loads((tmp_path / "e" / "export.json").read_text())["rewrite"]["fusions"]["skip_norm"] > 0
    code, _, err = run_cli(capsys, "generate", tmp_path / "e", "--prompt", "robot", "--max-tokens", "5",
                        "--temperature", "0")
    assert code == 0 and "5 generated" in err
    code, _, err = run_cli(capsys, "export", tiny_dense, "--out", tmp_path / "plain", "--max-seq", "64", "--no-rewrite")
    assert code == 0, err
    assert "rewrite" not in json.loads((tmp_path / "plain" / "export.json").read_text())
    assert not list(tmp_path.glob("**/.rewrite.tmp"))


@pytest.mark.parametrize("case", ["not_minicpm", "unwritable", "exists", "old_export", "too_long"])
def test_bad_input(case, tiny_dense, exports, tmp_path, capsys):
    if case == "not_minicpm":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        argv, needle = ["export", tmp_path / "m", "--out", tmp_path / "e"], "model_type"
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        argv, needle = ["export", tiny_dense, "--out", tmp_path / "file" / "e"], "cannot write"
    elif case == "exists":
        (tmp_path / "e").mkdir()
        (tmp_path / "e" / "keep").write_text("x")
        argv, needle = ["export", tiny_dense, "--out", tmp_path / "e"], "already exists"
    elif case == "old_export":
        import shutil
        old = shutil.copytree(exports["dense", "portable"], tmp_path / "old")
        info = json.loads((old / "export.json").read_text())
        (old / "export.json").write_text(json.dumps({**info, "format_version": 0}))
        argv, needle = ["generate", old, "--prompt", "hi"], "format_version"
    else:
        argv, needle = ["generate", exports["dense", "portable"], "--prompt", "robot " * 600], "at most 512"
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "e").exists() or case == "exists"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_open_bundle_refuses_what_it_cannot_serve(exports, tmp_path):
    from agent.backends import open_bundle

    with pytest.raises(AgentInputError, match="--flavor portable"):
        open_bundle(exports["dense", "trt"])
    with pytest.raises(AgentInputError, match="neither export.json nor manifest.json"):
        open_bundle(tmp_path)
