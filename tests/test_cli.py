"""`cpm-edge` subcommands on tiny folders, and every bad-input case: one line, exit 2, nothing written."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import run_cli


def assert_user_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def broken(tiny_dense, tmp_path):
    """A fresh copy of the tiny dense folder to damage."""
    return Path(shutil.copytree(tiny_dense, tmp_path / "model"))


def edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_logits_shape_and_values(tiny_dense, tmp_path, capsys):
    import torch
    from export.checkpoint import load_model

    rows = [[random.randrange(512) for _ in range(7)] for _ in range(2)]
    out = tmp_path / "logits.npy"
    code, _, err = run_cli(capsys, "logits", tiny_dense, "--input-ids", ",".join(map(str, rows[0])),
                           "--input-ids", ",".join(map(str, rows[1])), "--out", out)
    assert code == 0, err
    got = np.load(out)
    assert got.shape == (2, 7, 512) and got.dtype == np.float32
    model = load_model(tiny_dense)
    model.setup_cache(1, 7)
    with torch.inference_mode():
        row1 = model(torch.tensor([rows[1]]), torch.arange(7)[None])[0].numpy()
    np.testing.assert_allclose(got[1], row1, atol=2e-4, rtol=0)


def test_generate_streams_text(tiny_dense, capsys):
    code, out, err = run_cli(capsys, "generate", tiny_dense, "--prompt", "The robot arm", "--max-tokens", "12",
                             "--temperature", "0")
    assert code == 0, err
    assert out.strip() and "12 generated" in err
    code2, out2, _ = run_cli(capsys, "generate", tiny_dense, "--prompt", "The robot arm", "--max-tokens", "12",
                             "--temperature", "0")
    assert out2 == out  # greedy is deterministic


def test_generate_seeded_sampling_is_reproducible(tiny_dense, capsys):
    args = ["generate", tiny_dense, "--chat", "--prompt", "Hi", "--max-tokens", "10", "--temperature", "1",
            "--seed", "5"]
    assert run_cli(capsys, *args)[1] == run_cli(capsys, *args)[1]


def test_tiny_writes_a_complete_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, "tiny", tmp_path / "t", "--variant", "sparse", "--seed", "2")
    assert code == 0, err
    names = {p.name for p in (tmp_path / "t").iterdir()}
    assert names == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "model.safetensors"}
    assert json.loads((tmp_path / "t" / "config.json").read_text())["sparse_config"]["block_size"] == 32
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no temporary folder left behind


def test_tiny_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "tiny", tmp_path / "t")
    assert_user_error(code, err, str(tmp_path / "t"), "already exists")
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("damage, needles", [
    (lambda p: shutil.rmtree(p), ["not a directory"]),
    (lambda p: (p / "config.json").unlink(), ["config.json", "not found"]),
    (lambda p: ((p / "config.json").unlink(), (p / "config.json").mkdir()), ["config.json", "cannot read"]),
    (lambda p: (p / "config.json").write_text("{not json"), ["config.json", "not valid JSON"]),
    (lambda p: edit_config(p, model_type="llama"), ["model_type", "'llama'"]),
    (lambda p: edit_config(p, model_type=None, architectures=["LlamaForCausalLM"]), ["model_type", "missing"]),
    (lambda p: edit_config(p, hidden_size=512, num_attention_heads=8), ["model.safetensors", "shape", "model.embed_tokens.weight"]),
    (lambda p: edit_config(p, intermediate_size=100), ["model.safetensors", "shape", "mlp"]),
    (lambda p: edit_config(p, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
     ["rope_scaling.rope_type", "'yarn'"]),
    (lambda p: edit_config(p, num_key_value_heads=3), ["num_key_value_heads"]),
    (lambda p: edit_config(p, sparse_config={"topk": 0}), ["sparse_config.topk"]),
    (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 64), ["model.safetensors", "safetensors"]),
    (lambda p: (p / "model.safetensors").unlink(), ["model.safetensors"]),
    (lambda p: edit_config(p, tie_word_embeddings=False), ["lm_head.weight", "missing"]),
])
def test_bad_model_folder(broken, tmp_path, capsys, damage, needles):
    damage(broken)
    out = tmp_path / "logits.npy"
    code, _, err = run_cli(capsys, "logits", broken, "--input-ids", "1,2,3", "--out", out)
    assert_user_error(code, err, *needles)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_tokenizer_for_generate(broken, capsys):
    (broken / "tokenizer.json").unlink()
    code, out, err = run_cli(capsys, "generate", broken, "--prompt", "hi")
    assert_user_error(code, err, "tokenizer.json", "not found")
    assert out == ""


def test_token_id_out_of_vocab(tiny_dense, tmp_path, capsys):
    out = tmp_path / "x.npy"
    code, _, err = run_cli(capsys, "logits", tiny_dense, "--input-ids", "1,512,3", "--out", out)
    assert_user_error(code, err, "512", "vocabulary", "config.json")
    assert not out.exists()


def test_ragged_rows_are_refused(tiny_dense, tmp_path, capsys):
    out = tmp_path / "x.npy"
    code, _, err = run_cli(capsys, "logits", tiny_dense, "--input-ids", "1,2,3", "--input-ids", "1,2",
                           "--out", out)
    assert_user_error(code, err, "--input-ids", "different lengths")
    assert not out.exists()


def test_unwritable_output_folder(tiny_dense, tmp_path, capsys):
    code, _, err = run_cli(capsys, "logits", tiny_dense, "--input-ids", "1,2", "--out", tmp_path / "no" / "x.npy")
    assert_user_error(code, err, "--out", "does not exist")


def test_bad_sampling_argument(tiny_dense, capsys):
    code, out, err = run_cli(capsys, "generate", tiny_dense, "--prompt", "hi", "--top-p", "1.5")
    assert_user_error(code, err, "top_p")
    assert out == ""


def test_usage_error_exits_2(capsys):
    code, _, err = run_cli(capsys, "logits", "somewhere", "--input-ids", "a,b", "--out", "x.npy")
    assert code == 2 and "comma-separated integers" in err


def test_installed_command_exit_status(tmp_path):
    """The real console script: exit status 2 and no traceback for a folder that is not MiniCPM4."""
    exe = Path(sys.executable).with_name("cpm-edge")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    proc = subprocess.run([str(exe), "generate", str(tmp_path), "--prompt", "hi"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "config.json" in proc.stderr and "model_type" in proc.stderr


def test_sparse_checkpoint_runs_sparse_attention(tiny_models, tmp_path, capsys):
    """A prompt longer than dense_len: `logits` equals the model under use_sparse_attention, not dense."""
    import torch
    from export.checkpoint import load_model
    from export.transforms import use_sparse_attention

    path = tiny_models["sparse"]
    ids = [random.randrange(3, 500) for _ in range(random.randint(200, 260))]
    out = tmp_path / "s.npy"
    code, _, err = run_cli(capsys, "logits", path, "--input-ids", ",".join(map(str, ids)), "--out", out)
    assert code == 0, err
    got = np.load(out)[0]
    with torch.inference_mode():
        dense = load_model(path)
        dense.setup_cache(1, len(ids))
        dense_logits = dense(torch.tensor([ids]), torch.arange(len(ids))[None])[0].numpy()
        sparse = use_sparse_attention(load_model(path))
        sparse.setup_cache(1, len(ids))
        sparse_logits = sparse(torch.tensor([ids]), torch.arange(len(ids))[None])[0].numpy()
    np.testing.assert_allclose(got, sparse_logits, atol=2e-4, rtol=0)
    assert np.abs(got - dense_logits).max() > 1e-3


def test_ternary_packed_equals_fake_quantized(tiny_models, tmp_path, capsys):
    ids = ",".join(str(random.randrange(3, 500)) for _ in range(9))
    outs = {}
    for mode in ("off", "packed"):
        outs[mode] = tmp_path / f"{mode}.npy"
        code, _, err = run_cli(capsys, "logits", tiny_models["ternary"], "--input-ids", ids, "--out", outs[mode],
                               "--ternary", mode)
        assert code == 0, err
    np.testing.assert_allclose(np.load(outs["packed"]), np.load(outs["off"]), atol=2e-4, rtol=0)


def test_ternary_packed_refuses_a_dense_checkpoint(tiny_dense, tmp_path, capsys):
    out = tmp_path / "x.npy"
    code, _, err = run_cli(capsys, "logits", tiny_dense, "--input-ids", "1,2", "--out", out, "--ternary", "packed")
    assert_user_error(code, err, "--ternary packed", "model.layers.0.self_attn.q_proj.weight", "not a ternary")
    assert not out.exists()


def test_ternary_packed_generates(tiny_models, capsys):
    args = ["generate", tiny_models["ternary"], "--prompt", "robot", "--max-tokens", "8", "--temperature", "0"]
    assert run_cli(capsys, *args, "--ternary", "packed")[1] == run_cli(capsys, *args)[1]
