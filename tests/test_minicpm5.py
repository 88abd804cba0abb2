"""MiniCPM5 (plain LlamaForCausalLM) through the kit's one model file: config parsing, Hugging Face parity,
GGUF for llama.cpp's `llama`, the byte-level BPE text stream, and `make demo`'s path over a real Mosquitto.

The ONNX Runtime token equality and the TensorRT-RTX engine build for the tiny MiniCPM5 are parametrized
in tests/test_export.py and tests/test_tensorrt.py with the MiniCPM4 variants.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import IGNORED_KEYS, USED_KEYS, CheckpointError, config_from_dict, load_model

CONFIGS = Path(__file__).parent / "data" / "configs"
# fp32 on both sides, different summation orders: 1e-4 of the largest logit, as for the ONNX export.
REL_TOL = 1e-4
# MiniCPM5-1B's geometry (GitBubble/pico-minicpm5 configs/minicpm5-1b.json; see data/configs/SOURCES.md)
MINICPM5_1B = {"hidden_size": 1536, "intermediate_size": 4608, "num_hidden_layers": 24, "num_attention_heads": 16,
               "num_key_value_heads": 2, "head_dim": 128}


def real_config() -> dict:
    return json.loads((CONFIGS / "MiniCPM5-2B.config.json").read_text())


def test_published_config_parses_with_neutral_scalars():
    raw = real_config()
    assert set(raw) <= USED_KEYS | set(IGNORED_KEYS)
    c = config_from_dict(raw)
    assert (c.model_type, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == ("llama", 128, 16, 2)
    assert (c.scale_emb, c.residual_scale, c.logit_divisor) == (1.0, 1.0, 1.0)
    assert (c.rope_theta, c.rope_scaling, c.max_position_embeddings) == (5e6, None, 131072)
    assert not c.tie_word_embeddings and c.bos_token_id == 0 and c.eos_token_ids == [1, 130073]
    assert c.rms_norm_eps == 1e-6 and c.vocab_size == 130560 and c.sparse is None


def test_1b_head_dim_is_the_config_value_not_hidden_over_heads():
    c = config_from_dict({**real_config(), **MINICPM5_1B})
    assert c.head_dim == 128 != c.hidden_size // c.num_attention_heads
    with torch.device("meta"):
        from export.model import MiniCPM
        attn = MiniCPM(c).layers[0].self_attn
    assert attn.q_proj.weight.shape == (16 * 128, 1536) and attn.o_proj.weight.shape == (1536, 16 * 128)
    assert attn.k_proj.weight.shape == (2 * 128, 1536)


@pytest.mark.parametrize("change, key", [
    ({"model_type": "qwen3"}, "model_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e6}}, "rope_parameters.rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"scale_emb": 12}, "scale_emb"),
    ({"sparse_config": {"topk": 64}}, "sparse_config"),
    ({"head_dim": 127}, "head_dim"),
])
def test_what_the_kit_does_not_run_is_refused_naming_the_key(change, key):
    with pytest.raises(CheckpointError) as e:
        config_from_dict({**real_config(), **change}, source="x/config.json")
    assert str(e.value).startswith(f"x/config.json: key '{key}'") and "\n" not in str(e.value)


def test_transformers_5_rope_parameters_default_is_plain_rope():
    raw = {k: v for k, v in real_config().items() if k not in ("rope_theta", "rope_scaling")}
    c = config_from_dict({**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0}})
    assert c.rope_theta == 5e6 and c.rope_scaling is None


def test_tiny_folder_has_the_real_key_set_and_an_explicit_head_dim(tiny_models):
    raw = json.loads((tiny_models["minicpm5"] / "config.json").read_text())
    assert set(raw) == set(real_config())
    assert raw["head_dim"] != raw["hidden_size"] // raw["num_attention_heads"]
    names = {p.name for p in tiny_models["minicpm5"].iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
            "model.safetensors"} <= names


def test_cli_tiny_and_a_refused_model_type(tmp_path, capsys):
    """`cpm-edge tiny --variant minicpm5` writes the folder; `cpm-edge logits` on a config of another
    model_type exits 2 with one line naming the key."""
    from cli_helpers import run_cli

    code, _, err = run_cli(capsys, "tiny", tmp_path / "m5", "--variant", "minicpm5", "--seed", "3")
    assert code == 0 and "MiniCPM5" in err, err
    raw = json.loads((tmp_path / "m5" / "config.json").read_text())
    assert (raw["model_type"], raw["head_dim"], raw["hidden_size"] // raw["num_attention_heads"]) == ("llama", 128, 64)
    (tmp_path / "m5" / "config.json").write_text(json.dumps({**raw, "model_type": "qwen3"}))
    code, _, err = run_cli(capsys, "logits", tmp_path / "m5", "--input-ids", "0,5,6", "--out", tmp_path / "l.npy")
    assert code == 2 and "key 'model_type' is 'qwen3'" in err and len(err.strip().splitlines()) == 1, err


def test_logits_equal_hugging_face_llama_prefill_and_decode(tiny_models, seed):
    """Our model with its KV cache, prefill then 6 decode steps, against transformers' LlamaForCausalLM on the
    same folder (the whole sequence each step, no cache on their side)."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")
    folder = tiny_models["minicpm5"]
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert theirs.config.head_dim == 128
    ours = load_model(folder, torch.float32)
    ours.setup_cache(1, 128)
    T = random.randint(20, 60)
    ids = torch.randint(0, 512, (1, T))
    with torch.inference_mode():
        got = ours(ids, torch.arange(T)[None])
        expected = theirs(ids).logits
        steps = [(got, expected)]
        for t in range(T, T + 6):
            nxt = torch.randint(0, 512, (1, 1))
            ids = torch.cat([ids, nxt], 1)
            steps.append((ours(nxt, torch.tensor([[t]])), theirs(ids).logits[:, -1:]))
    for i, (a, b) in enumerate(steps):
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel < REL_TOL, f"step {i}: {rel:.2e} of the largest logit"


def test_text_stream_decodes_byte_level_bpe_like_a_full_decode(tiny_models, seed):
    """Multi-byte UTF-8 split across tokens and leading spaces (Ġ): the streamed deltas join to tokenizers'
    own full decode and no delta ever carries half a character."""
    from agent.tokenizer import TextStream, Tokenizer

    tok = Tokenizer(tiny_models["minicpm5"])
    words = ["robot", " arm", " 23", "°C", " Größe", " 机器人", " 你好", "🤖", " 🚀✨", " déjà", " vu", "\n", "  ", "π"]
    text = "".join(random.choice(words) for _ in range(60))
    ids = tok.encode(text, bos=False)
    pieces = [tok._tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test text should split a character across tokens"
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_chat_template_of_the_checkpoint_renders_bos_and_thinking(tiny_models):
    from agent.tokenizer import Tokenizer

    tok = Tokenizer(tiny_models["minicpm5"])
    assert tok.chat_template_source == "checkpoint" and tok.bos_id == 0 and tok.eos_ids == [1, 503]
    text = tok.render_chat([{"role": "user", "content": "hi"}], {"enable_thinking": False})
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok.encode(text)
    assert ids[0] == 0 and ids.count(0) == 1  # the template's <s>, not a second one from add_bos


def test_gguf_is_llama_cpp_llama_with_a_byte_level_vocab(tiny_models, tmp_path):
    """The GGUF's keys and tensor names are gguf-py's for LLAMA; head_dim rides in key_length; the vocab,
    merges and specials are tokenizer.json's; q/k rows are permuted to llama.cpp's pair layout."""
    gguf = pytest.importorskip("gguf", reason="gguf is not installed (make bench-cpu installs it)")
    from safetensors.torch import load_file

    from export.gguf_export import rope_pairs_from_halves, write_gguf

    folder = tiny_models["minicpm5"]
    reader = gguf.GGUFReader(str(write_gguf(folder, tmp_path / "m5.gguf", "f32")))
    field = {k: f.contents() for k, f in reader.fields.items()}
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    assert field[gguf.Keys.General.ARCHITECTURE] == arch
    assert field[gguf.Keys.Attention.KEY_LENGTH.format(arch=arch)] == 128
    assert field[gguf.Keys.Attention.VALUE_LENGTH.format(arch=arch)] == 128
    assert field[gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch)] == 128
    assert field[gguf.Keys.Rope.FREQ_BASE.format(arch=arch)] == 5e6
    assert not any("scale" in k for k in field), "llama has no muP keys"
    assert field[gguf.Keys.Tokenizer.MODEL] == "gpt2" and field[gguf.Keys.Tokenizer.PRE] == "minicpm5"
    tj = json.loads((folder / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tj["model"]["vocab"].items()} | {t["id"]: t["content"] for t in tj["added_tokens"]}
    assert field[gguf.Keys.Tokenizer.LIST] == [by_id[i] for i in range(512)]
    assert field[gguf.Keys.Tokenizer.MERGES] == [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    types = field[gguf.Keys.Tokenizer.TOKEN_TYPE]
    assert types[503] == types[0] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert (field[gguf.Keys.Tokenizer.BOS_ID], field[gguf.Keys.Tokenizer.EOS_ID]) == (0, 1)
    assert "enable_thinking" in field[gguf.Keys.Tokenizer.CHAT_TEMPLATE]

    allowed = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA]
               for i in range(2)}
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) <= allowed and "output.weight" in tensors and len(tensors) == 3 + 2 * 9
    hf = load_file(str(folder / "model.safetensors"))
    q = hf["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_q.weight"].data), rope_pairs_from_halves(q, 4))
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data), hf["lm_head.weight"].float().numpy())


def test_llama_cpp_logits_match_torch(tiny_models, tmp_path):
    """llama.cpp's own llama graph on the GGUF, against ours (needs llama-cpp-python with the minicpm5
    pre-tokenizer, llama.cpp b9354 or later; token ids are fed directly)."""
    pytest.importorskip("gguf", reason="gguf is not installed (make bench-cpu installs it)")
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench-cpu builds it)")
    from export.gguf_export import write_gguf

    folder = tiny_models["minicpm5"]
    path = write_gguf(folder, tmp_path / "m5.gguf", "f32")
    ids = [0] + np.random.default_rng(4).integers(2, 480, size=63).tolist()
    model = load_model(folder)
    model.setup_cache(1, 128)
    with torch.inference_mode():
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0].numpy()
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, n_ubatch=128, logits_all=True, n_threads=2,
                          type_k=0, type_v=0, seed=0, verbose=False)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert np.abs(ours - theirs).max() / np.abs(ours).max() < REL_TOL


def test_make_demo_path_answers_over_mosquitto(tiny_models, tmp_path):
    """`make demo` on a tiny MiniCPM5: `cpm-edge export`, then agent/demo.py (Mosquitto, `cpm-edge agent` on the
    export in ONNX Runtime, `cpm-edge ask --chat`). The greedy answer is the torch model's for the chat the
    checkpoint's template renders."""
    import shutil

    from agent.generation import SamplingParams, generate
    from agent.tokenizer import Tokenizer
    from export.torch_backend import TorchBackend

    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed")
    folder, export_dir = tiny_models["minicpm5"], tmp_path / "export"
    cli = [sys.executable, "-m", "cli.main"]
    subprocess.run(cli + ["export", str(folder), "--out", str(export_dir), "--max-seq", "256"], check=True,
                   timeout=300, capture_output=True)
    prompt = "Which block should the robot pick up? 机器人"
    proc = subprocess.run([sys.executable, "-m", "agent.demo", "--bundle", str(export_dir), "--prompt", prompt,
                           "--chat", "--max-tokens", "24", "--temperature", "0", "--schema-demo"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Mosquitto" in proc.stderr
    tok = Tokenizer(export_dir)
    ids = tok.encode_chat([{"role": "user", "content": prompt}])
    assert ids[0] == 0
    expected = generate(TorchBackend(load_model(folder), max_batch=1, max_seq=256), tok, [ids],
                        [SamplingParams(max_tokens=24)])[0]
    answer, constrained = proc.stdout[:-1].rsplit("\n", 1)  # `ask` ends each streamed answer with one newline
    assert answer == expected.text
    # --schema-demo (make demo's second question): JSON the robot's code can act on, whatever the weights
    import jsonschema

    from agent.demo import DEMO_SCHEMA
    value = json.loads(constrained)
    jsonschema.validate(value, DEMO_SCHEMA)
    assert f"[parsed: {json.dumps(value)}]" in proc.stderr
    assert f"[{len(ids)} prompt tokens, {len(expected.token_ids)} generated" in proc.stderr
