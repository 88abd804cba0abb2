"""Write a Hugging Face MiniCPM4 folder as a GGUF for llama.cpp's `minicpm` architecture, MiniCPM5 for `llama`.

Only the `gguf` package (pip install gguf) and the kit's own checkpoint reader are used. What llama.cpp's
minicpm graph computes, and what this file writes for it (facts read from llama.cpp's src/models/minicpm.cpp,
granite.cpp, llama-model.cpp, llama-context.cpp, ggml-cpu rope):
  embedding   embed(ids) * minicpm.embedding_scale                     <- scale_emb
  residual    h + f(x) * minicpm.residual_scale                         <- scale_depth / sqrt(num_layers)
  logits      lm_head(norm(h)) / minicpm.logit_scale                    <- hidden_size / dim_model_base
  RoPE        "normal" mode: rotates adjacent pairs (2i, 2i+1), so the q/k projections' rows are permuted from
              the Hugging Face rotate-half layout (i, i + d/2); theta_i = pos * base^(-2i/d) / factor_i, and
              cos/sin times rope.scaling.attn_factor
  LongRoPE    rope_factors_long.weight / rope_factors_short.weight; long when the context (n_ctx per sequence)
              > rope.scaling.original_context_length (llama.cpp defaults that key to context_length, so it is
              always written here)
  lm_head     output.weight; absent when tied: llama.cpp then uses token_embd.weight
Two differences from the kit's model (export/model.py) are resolved here so that llama.cpp computes ours:
  * cos/sin scale sqrt(1 + ln(max_pos / original) / ln(original)): llama.cpp's longrope path applies only
    rope.scaling.attn_factor (its yarn mscale is off for longrope), so the scale is written there.
  * factor choice: ours is long when max(max_position_embeddings, capacity) > original; llama.cpp looks at
    the capacity only. When max_position_embeddings > original the kit always uses the long factors, so both
    factor tensors get the long list.
The tokenizer section is a llama-style (SentencePiece) vocabulary built from tokenizer.json: every token,
byte tokens typed BYTE, specials CONTROL, ids the model has but the tokenizer lacks padded as UNUSED. It is
enough for llama.cpp to load the model and detokenize; scores are -id (merge order), not the real
SentencePiece scores, so llama.cpp's own tokenization of text may differ from ours: feed token ids.

MiniCPM5 (model_type llama) is written as llama.cpp's `llama` architecture, as llama.cpp's own
convert_hf_to_gguf.py does (LlamaModel): no muP keys (its scalars are all 1), attention.key_length /
value_length = head_dim (128, while hidden / heads is 96 in the 1B), the same q/k row permutation, and a
byte-level BPE vocabulary: tokenizer.ggml.model "gpt2", tokens as tokenizer.json spells them (bytes-to-unicode),
merges "a b", added special tokens CONTROL and other added tokens USER_DEFINED, and tokenizer.ggml.pre
"minicpm5" (llama.cpp b9354 and later), the pre-tokenizer whose regexes llama.cpp quotes from MiniCPM5's
tokenizer.json; a tokenizer.json with another pre-tokenizer is refused.

Q4_0 (`--dtype q4_0`): the attention and MLP projections in blocks of 32 inputs, each an fp16 scale d and 32
4-bit codes (value = (code - 8) * d; byte j of a block holds element j in its low nibble and element j + 16 in
its high one, ggml's block_q4_0), quantized by trt_plugins/int4/reference.quantize_rtn, the very function
`cpm-edge export --weights int4 --group-size 32` uses: both files then hold the same numbers. Embeddings,
norms and the lm_head stay f32, as the kit's int4 exports keep them float.

    python -m export.gguf_export MODEL_DIR OUT.gguf [--dtype f32|f16|q4_0]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from export.checkpoint import CheckpointError, load_config, read_json, weight_files
from export.model import MiniCPMConfig, longrope_scale

ARCH = "minicpm"
ARCH_BY_MODEL_TYPE = {"minicpm": "minicpm", "llama": "llama"}
# tokenizer.ggml.pre by the Split regexes before ByteLevel in tokenizer.json's pre_tokenizer (llama-vocab.cpp)
BYTE_LEVEL_PRE = {
    (r"\p{N}{1,3}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+"): "minicpm5",
}
DTYPES = ("f32", "f16", "q4_0")
Q4_0_BLOCK = 32  # inputs per Q4_0 block (ggml QK4_0)
# HF tensor name (after "model.layers.{i}.") -> llama.cpp tensor name (after "blk.{i}.")
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def rope_pairs_from_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection, per head, from rotate-half to adjacent pairs.

    w: (n_heads * D, in). Row i and row i + D/2 of a head form one rotation pair in the Hugging Face layout;
    llama.cpp's normal RoPE rotates rows 2i and 2i + 1. New row 2i + s is old row s * D/2 + i.
    """
    out_f, in_f = w.shape
    d = out_f // n_heads
    return w.reshape(n_heads, 2, d // 2, in_f).swapaxes(1, 2).reshape(out_f, in_f)


def q4_0_blocks(weight: torch.Tensor) -> np.ndarray:
    """(N, K) float -> (N, K / 32 * 18) uint8: ggml block_q4_0 rows of quantize_rtn's groups of 32."""
    from trt_plugins.int4.reference import codes_of, quantize_rtn

    N, K = weight.shape
    if K % Q4_0_BLOCK:
        raise CheckpointError(f"q4_0: in_features {K} is not a multiple of {Q4_0_BLOCK}")
    packed = quantize_rtn(weight.float(), Q4_0_BLOCK, symmetric=True, scale_dtype=torch.float16)
    codes = codes_of(packed).to(torch.uint8).reshape(N, K // Q4_0_BLOCK, 2, Q4_0_BLOCK // 2)  # (N, G, half, 16)
    qs = (codes[:, :, 0] | (codes[:, :, 1] << 4)).numpy()  # (N, G, 16): element j low, j + 16 high
    d = packed.scales.numpy().astype(np.float16).view(np.uint8).reshape(N, -1, 2)  # (N, G, 2) little-endian
    return np.ascontiguousarray(np.concatenate([d, qs], axis=-1).reshape(N, -1))


def rope_settings(c: MiniCPMConfig) -> dict:
    """What the GGUF says about RoPE so that llama.cpp computes export/model.py's rope_table."""
    rs = c.rope_scaling
    if rs is None:
        return {}
    always_long = c.max_position_embeddings > rs.original_max
    return {"long": rs.long_factor, "short": rs.long_factor if always_long else rs.short_factor,
            "original_max": rs.original_max, "attn_factor": longrope_scale(c)}


def vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[float], list[int], dict]:
    """tokens, scores, types (each of length vocab_size) and tokenizer facts from tokenizer.json."""
    tok_path = model_dir / "tokenizer.json"
    data = read_json(tok_path)
    model = data.get("model") or {}
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise CheckpointError(f"{tok_path}: key 'model.vocab' is missing (expected a BPE/SentencePiece vocab)")
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    special: set[int] = set()
    for t in data.get("added_tokens") or []:
        by_id[t["id"]] = t["content"]
        if t.get("special"):
            special.add(t["id"])
    too_big = [i for i in by_id if i >= vocab_size]
    if too_big:
        raise CheckpointError(f"{tok_path}: token id {max(too_big)} is outside the model's vocab_size {vocab_size}")
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(text)
            if i in special:
                types.append(UNKNOWN if text == model.get("unk_token") else CONTROL)
            elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                types.append(BYTE)
            else:
                types.append(NORMAL)
        scores.append(-float(i))
    if len(set(tokens)) != len(tokens):
        raise CheckpointError(f"{tok_path}: duplicate token strings (llama.cpp needs them unique)")
    ids = {t: i for i, t in enumerate(tokens)}
    facts = {"unk": ids.get(model.get("unk_token") or "<unk>"),
             "add_space_prefix": "Prepend" in json.dumps(data.get("normalizer") or data.get("pre_tokenizer"))}
    return tokens, scores, types, facts


def byte_level_pre_name(data: dict, tok_path: Path) -> str:
    """llama.cpp's name for tokenizer.json's pre-tokenizer: Split regexes then ByteLevel without its own regex."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = tuple(st.get("pattern", {}).get("Regex") for st in steps if st.get("type") == "Split")
    tail = steps[-1] if steps else {}
    if tail.get("type") == "ByteLevel" and not tail.get("use_regex", True) and splits in BYTE_LEVEL_PRE:
        return BYTE_LEVEL_PRE[splits]
    raise CheckpointError(f"{tok_path}: key 'pre_tokenizer' is not MiniCPM5's (Split \\p{{N}}{{1,3}}, the word regex, "
                          f"ByteLevel): llama.cpp would split text differently")


def byte_level_vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict]:
    """tokens, types, merges and tokenizer facts of a byte-level BPE tokenizer.json (llama.cpp's "gpt2")."""
    tok_path = model_dir / "tokenizer.json"
    data = read_json(tok_path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{tok_path}: key 'model' is not a BPE model with a vocab")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: bool(t.get("special")) for t in data.get("added_tokens") or []}
    by_id.update({t["id"]: t["content"] for t in data.get("added_tokens") or []})
    too_big = [i for i in by_id if i >= vocab_size]
    if too_big:
        raise CheckpointError(f"{tok_path}: token id {max(too_big)} is outside the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL if i not in added else CONTROL if added[i] else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges, {"pre": byte_level_pre_name(data, tok_path)}


def add_sentencepiece_vocab(w, model_dir: Path, c: MiniCPMConfig, tok_config: dict):
    """MiniCPM4's vocabulary as llama.cpp's "llama" (SentencePiece) tokenizer."""
    tokens, scores, types, facts = vocabulary(model_dir, c.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_ids[-1])  # the chat end (<|im_end|>) when listed; llama.cpp also stops on eog
    if facts["unk"] is not None:
        w.add_unk_token_id(facts["unk"])
    w.add_add_bos_token(bool(tok_config.get("add_bos_token", True)))
    w.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))
    w.add_add_space_prefix(facts["add_space_prefix"])


def add_byte_level_vocab(w, model_dir: Path, c: MiniCPMConfig, tok_config: dict):
    """MiniCPM5's vocabulary as llama.cpp's "gpt2" (byte-level BPE) tokenizer, as its converter writes it."""
    tokens, types, merges, facts = byte_level_vocabulary(model_dir, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(facts["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_ids[0])  # </s>, as the published MiniCPM5 GGUFs; <|im_end|> is eog by name
    if len(c.eos_token_ids) > 1:
        w.add_eot_token_id(c.eos_token_ids[-1])
    pad = read_json(model_dir / "config.json").get("pad_token_id")
    if isinstance(pad, int) and not isinstance(pad, bool):
        w.add_pad_token_id(pad)
    if "add_bos_token" in tok_config:  # else llama.cpp's default for the pre-tokenizer (no bos)
        w.add_add_bos_token(bool(tok_config["add_bos_token"]))
    w.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))


def write_gguf(model_dir: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Write model_dir as a GGUF at `out`: f32; f16 matrices with f32 norms and factors; or q4_0 projections
    (quantize_rtn's groups of 32) with everything else f32."""
    import gguf

    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    c = load_config(model_dir)
    from export.quantized import read_quant_config
    spec = read_quant_config(model_dir)
    if spec is not None:
        raise CheckpointError(f"{spec.source}: the checkpoint is already quantized ({spec.method}); the GGUF writer "
                              f"reads float weights (write --dtype q4_0 from the float checkpoint)")
    if c.sparse is not None:
        print(f"gguf: {model_dir} has a sparse_config; llama.cpp has no InfLLM v2, it will attend densely",
              file=sys.stderr)
    files = weight_files(model_dir)
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = read_json(tok_config_path) if tok_config_path.exists() else {}
    arch = ARCH_BY_MODEL_TYPE[c.model_type]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(Path(model_dir).resolve().name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    if arch == "minicpm":
        w.add_embedding_scale(c.scale_emb)
        w.add_residual_scale(c.residual_scale)
        w.add_logit_scale(c.logit_divisor)
    else:  # llama.cpp's llama reads head_dim here; its default n_embd / n_head is not MiniCPM5's
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype])
    rope = rope_settings(c)
    if rope:
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_orig_ctx_len(rope["original_max"])
        w.add_rope_scaling_attn_factors(rope["attn_factor"])

    if arch == "minicpm":
        add_sentencepiece_vocab(w, model_dir, c, tok_config)
    else:
        add_byte_level_vocab(w, model_dir, c, tok_config)
    template_file = model_dir / "chat_template.jinja"  # transformers reads this file first, as llama.cpp's converter
    template = (template_file.read_text(encoding="utf-8") if template_file.exists()
                else tok_config.get("chat_template"))
    if isinstance(template, str):
        w.add_chat_template(template)

    def add(name: str, t: torch.Tensor, permute_heads: int = 0):
        if dtype == "q4_0" and name.startswith("blk.") and t.dim() == 2:  # the seven projections of a layer
            blocks = q4_0_blocks(t)
            if permute_heads:  # whole rows move, so the blocks move with them
                blocks = rope_pairs_from_halves(blocks, permute_heads)
            w.add_tensor(name, np.ascontiguousarray(blocks), raw_dtype=gguf.GGMLQuantizationType.Q4_0)
            return
        a = t.to(torch.float32).numpy()
        if permute_heads:
            a = rope_pairs_from_halves(a, permute_heads)
        if dtype == "f16" and a.ndim == 2:
            a = a.astype(np.float16)
        w.add_tensor(name, np.ascontiguousarray(a))

    if rope:
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short"], dtype=np.float32))
    from safetensors import safe_open
    wanted = dict(GLOBAL_TENSORS)
    if c.tie_word_embeddings:
        wanted.pop("lm_head.weight")
    for i in range(c.num_hidden_layers):
        for hf, ours in LAYER_TENSORS.items():
            wanted[f"model.layers.{i}.{hf}"] = f"blk.{i}.{ours}"
    missing = [n for n in wanted if n not in files]
    if missing:
        raise CheckpointError(f"{model_dir}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    for hf, ours in wanted.items():  # the writer holds every array until write_tensors_to_file
        with safe_open(str(files[hf]), framework="pt") as f:
            t = f.get_tensor(hf)
        heads = (c.num_attention_heads if hf.endswith("q_proj.weight")
                 else c.num_key_value_heads if hf.endswith("k_proj.weight") else 0)
        add(ours, t, heads)

    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.gguf_export", description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="f32; f16 matrices (norms and RoPE factors stay f32); q4_0 projections (the values of "
                        "`cpm-edge export --weights int4 --group-size 32`)")
    args = p.parse_args(argv)
    try:
        write_gguf(args.model_dir, args.out, args.dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
