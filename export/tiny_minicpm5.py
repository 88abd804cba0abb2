"""The tiny MiniCPM5 folder: Hugging Face's plain Llama layout at toy size, with MiniCPM5's key set and tokenizer.

What it copies from the published MiniCPM5 checkpoints (config key set: tests/data/configs/, with sources):
  config.json      LlamaForCausalLM / model_type llama, explicit head_dim (here 128 while hidden / heads is 64,
                   so a model that derives head_dim fails), no muP keys, rope_scaling null, rope_theta 5e6,
                   untied lm_head, bos 0, eos [</s>, <|im_end|>], pad 1
  tokenizer.json   byte-level BPE: numbers split into runs of 1-3 digits, then the Llama-3 style word regex,
                   ByteLevel bytes-to-unicode (no prefix space), ByteLevel decoder; `<s>` = 0, `</s>` = 1, and
                   MiniCPM5's added special tokens (ChatML, think, tool-call tags)
  chat_template.jinja  MiniCPM5's template as published in llama.cpp's models/templates/MiniCPM5.jinja (bos,
                   ChatML, `enable_thinking`, XML tool calls), a file beside tokenizer_config.json as in the
                   released folders
The pre-tokenizer regexes are the ones llama.cpp's `minicpm5` pre-tokenizer quotes from MiniCPM5's
tokenizer.json (src/llama-vocab.cpp).
"""
from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 512
TRAINED_SPECIAL = ["<s>", "</s>"]  # ids 0 and 1, as in MiniCPM5 (bos 0, eos 1)
# MiniCPM5's added special tokens (astrowar/MiniCPM5.cpp include/minicpm_special_tokens.h, generated from the
# released tokenizer), pinned to the last ids of the tiny vocab.
ADDED_SPECIAL = ["<tool_call>", "</tool_call>", "<|im_sep|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                 "<think>", "</think>", "<tool_response>", "</tool_response>", "<tools>", "</tools>",
                 "<arguments>", "</arguments>", "<parameters>", "</parameters>", "<function", "</function>",
                 "<param", "</param>", "<|im_start|>", "<|im_end|>", "<unk>", "<|thought_begin|>",
                 "<|thought_end|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>", "/think", "/no_think"]
IM_END_ID = VOCAB_SIZE - len(ADDED_SPECIAL) + ADDED_SPECIAL.index("<|im_end|>")
DIGITS_REGEX = r"\p{N}{1,3}"
WORDS_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE_FILE = Path(__file__).with_name("minicpm5_chat_template.jinja")
# Text the BPE is trained on: English, digits, and multi-byte UTF-8 so that merges span byte boundaries.
CORPUS = """\
MiniCPM5 runs on Jetson Orin and RTX GPUs; the agent answers robots and sensors over MQTT.
The robot arm picks up the red block at 12:45 and places it 300 mm to the left of the camera.
Temperatur im Gewächshaus: 23 °C, Luftfeuchte 61 %. Größe, Straße, naïve café — déjà vu.
机器人正在搬运红色的方块。温度是二十三度。你好，世界！
ロボットは赤いブロックを運びます。 안녕하세요 로봇입니다. Emoji: 🤖🚀✨ and π ≈ 3.14159.
"""


def tiny_config(seed: int = 0, **overrides) -> dict:
    """A config.json dict with the key set of the released MiniCPM5 configs, at toy size."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": [1, IM_END_ID],
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 640,
        "max_position_embeddings": 1024,
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pad_token_id": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 5000000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "5.6.2",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }
    config.update(overrides)
    return config


def build_tokenizer_json() -> str:
    """A MiniCPM5-style byte-level BPE trained on CORPUS, special tokens at MiniCPM5's places."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())  # byte-level: every byte has a token, no unk needed
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(DIGITS_REGEX), behavior="isolated"),
        pre_tokenizers.Split(Regex(WORDS_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - len(ADDED_SPECIAL), show_progress=False,
                                  special_tokens=TRAINED_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_SPECIAL])
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) + len(ADDED_SPECIAL) > VOCAB_SIZE:
        raise RuntimeError("tiny MiniCPM5 tokenizer outgrew VOCAB_SIZE")
    first_added = VOCAB_SIZE - len(ADDED_SPECIAL)
    for t in data["added_tokens"]:  # pin the added tokens to the last ids, whatever size the trainer reached
        if t["content"] in ADDED_SPECIAL:
            t["id"] = first_added + ADDED_SPECIAL.index(t["content"])
    return json.dumps(data, ensure_ascii=False, indent=1)


def text_files(config: dict) -> dict[str, str]:
    """The folder's text files besides config.json and the weights: name -> content."""
    return {
        "generation_config.json": json.dumps({"bos_token_id": 0, "do_sample": True, "eos_token_id": config["eos_token_id"],
                                              "pad_token_id": 1, "temperature": 1.0, "top_p": 0.95}, indent=2),
        "tokenizer.json": build_tokenizer_json(),
        "tokenizer_config.json": json.dumps(
            {"add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|im_end|>",
             "pad_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
             "model_max_length": config["max_position_embeddings"], "tokenizer_class": "PreTrainedTokenizerFast"},
            indent=2),
        "chat_template.jinja": CHAT_TEMPLATE_FILE.read_text(encoding="utf-8"),
    }
