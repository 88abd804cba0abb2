"""Tiny MiniCPM4 folders in the real Hugging Face format, for tests and the demo (no model hub needed).

A tiny folder has everything a real one has: config.json with the published key set, bf16 safetensors with
the real tensor names, a sentencepiece-style tokenizer.json (byte fallback, ChatML special tokens) built with
`tokenizers`, tokenizer_config.json and generation_config.json. Weights are random: the text is gibberish,
every code path is real.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from export import tiny_minicpm5
from export.checkpoint import AtomicDir, config_from_dict, hf_state_dict, save_weights
from export.model import MiniCPM

VARIANTS = ("dense", "sparse", "ternary", "minicpm5")  # minicpm5: a plain-Llama MiniCPM5 (export/tiny_minicpm5.py)
VOCAB_SIZE = 512
SPECIAL = ["<unk>", "<s>", "</s>"]
CHAT_SPECIAL = ["<|im_start|>", "<|im_end|>"]  # the last two ids, as in the real vocab (73440 = <|im_end|>)
CORPUS = """\
MiniCPM Edge runs small language models on Jetson Orin and RTX GPUs for robots and sensors.
The robot arm picks up the red block, turns it over and places it on the tray beside the camera.
Hello! How are you today? The temperature in the greenhouse is 23 degrees and the humidity is 61 percent.
A drone reports its battery, position and speed every second; the agent answers questions about them.
Sparse attention reads only the blocks of the context that matter, so long prompts stay fast.
Ternary weights are -1, 0 or +1 times a scale: four of them fit in one byte.
"""
# InfLLM v2 scaled down so that prompts of a few hundred tokens exercise every part of it.
TINY_SPARSE = {"kernel_size": 16, "kernel_stride": 8, "init_blocks": 1, "block_size": 32, "window_size": 64,
               "topk": 4, "use_nope": False, "dense_len": 128}
TERNARY_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(variant: str = "dense", seed: int = 0, **overrides) -> dict:
    """A config.json dict with the key set of the published MiniCPM4 configs, at toy size."""
    if variant == "minicpm5":
        return tiny_minicpm5.tiny_config(seed, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    head_dim = 64
    half = head_dim // 2
    short = torch.linspace(1.0, 4.0, half) + 0.1 * torch.rand(half, generator=g)
    long = short * torch.linspace(1.0, 6.0, half)
    config = {
        "_name_or_path": f"minicpm-edge/tiny-{variant}",
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                     "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"},
        "bos_token_id": 1,
        "eos_token_id": [2, VOCAB_SIZE - 1],
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.1,
        "intermediate_size": 640,
        "max_position_embeddings": 1024,
        "model_type": "minicpm",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"rope_type": "longrope", "long_factor": [round(float(x), 6) for x in long],
                         "short_factor": [round(float(x), 6) for x in short],
                         "original_max_position_embeddings": 1024},
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        "scale_emb": 12,
        "dim_model_base": 32,
        "scale_depth": 1.4,
        "mup_denominator": 32,
        "tie_word_embeddings": True,
    }
    if variant == "sparse":
        config["sparse_config"] = dict(TINY_SPARSE)
    if variant == "ternary":
        config["_name_or_path"] = "minicpm-edge/tiny-bitcpm4"
    config.update(overrides)
    return config


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the Hugging Face tensor names, bf16 like the released checkpoints."""
    torch.manual_seed(seed)
    model = MiniCPM(config_from_dict(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5)
    return {k: v.to(torch.bfloat16) for k, v in hf_state_dict(model).items()}


def fake_quantize_ternary(w: torch.Tensor, group: int | str = "row") -> torch.Tensor:
    """BitCPM4-style fake quantization: scale * {-1, 0, +1}, scale = mean |w| per group.

    group: "tensor", "row" (per output channel) or an int (groups of that many inputs along a row).
    """
    out_f, in_f = w.shape
    if group == "tensor":
        g = w.reshape(1, -1)
    elif group == "row":
        g = w
    else:
        g = w.reshape(out_f * in_f // group, group)
    scale = g.abs().mean(dim=1, keepdim=True).clamp_min(1e-5)
    return ((g / scale).round().clamp(-1, 1) * scale).reshape(out_f, in_f)


def build_tokenizer_json() -> str:
    """A Llama/MiniCPM-style BPE: '▁' for spaces, byte fallback for anything unseen, ChatML specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # Llama-2 style ("legacy"): every text segment, also the one after a special token, gets a '▁'.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(CHAT_SPECIAL), show_progress=False,
                                  special_tokens=SPECIAL + byte_tokens)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL])
    data = json.loads(tok.to_str())
    # Byte tokens belong to the model's vocab, not to the added (special) tokens that decoding skips.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_tokens]
    vocab = data["model"]["vocab"]
    if len(vocab) + len(CHAT_SPECIAL) > VOCAB_SIZE:
        raise RuntimeError("tiny tokenizer outgrew VOCAB_SIZE")
    # Pin the chat tokens to the last ids, whatever size the trainer reached.
    for i, t in enumerate(data["added_tokens"]):
        if t["content"] in CHAT_SPECIAL:
            t["id"] = VOCAB_SIZE - len(CHAT_SPECIAL) + CHAT_SPECIAL.index(t["content"])
    return json.dumps(data, ensure_ascii=False, indent=1)


def write_tiny(out_dir: str | Path, variant: str = "dense", seed: int = 0, shards: int = 1,
               ternary_group: int | str = "row", overwrite: bool = False, **config_overrides) -> Path:
    """Write a complete tiny MiniCPM4 folder; returns its path."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    config = tiny_config(variant, seed, **config_overrides)
    weights = random_weights(config, seed)
    if variant == "ternary":
        for name, w in weights.items():
            if name.split(".")[-2] in TERNARY_LAYERS:
                weights[name] = fake_quantize_ternary(w.float(), ternary_group).to(torch.bfloat16)
    if variant == "minicpm5":
        with AtomicDir(out_dir, overwrite=overwrite) as tmp:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            for name, text in tiny_minicpm5.text_files(config).items():
                (tmp / name).write_text(text, encoding="utf-8")
            save_weights(weights, tmp, shards=shards)
        return Path(out_dir)
    with AtomicDir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": config["eos_token_id"], "do_sample": True,
             "temperature": 0.8, "top_p": 0.8}, indent=2))
        (tmp / "tokenizer.json").write_text(build_tokenizer_json(), encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|im_end|>",
             "unk_token": "<unk>", "model_max_length": config["max_position_embeddings"],
             "chat_template": CHAT_TEMPLATE}, indent=2))
        save_weights(weights, tmp, shards=shards)
    return Path(out_dir)


# The chat_template of the released MiniCPM4 checkpoints' tokenizer_config.json, character for character
# (ChatML; the agent renders it with jinja2: agent/chat_template.py).
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")
