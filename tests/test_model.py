"""The torch MiniCPM4 model: cache, batching, LongRoPE, muP scalars, checkpoint loading."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from export.checkpoint import load_config, load_model
from export.model import MiniCPM, rope_table
from export.tiny import write_tiny

# fp32 on CPU: the same math in a different order (one token at a time vs all at once) differs by rounding.
FP32_ATOL = 2e-4


def full_logits(model: MiniCPM, ids: torch.Tensor) -> torch.Tensor:
    model.setup_cache(ids.shape[0], ids.shape[1])
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    return model(ids, pos)


@torch.inference_mode()
def test_decode_with_cache_equals_full_forward(tiny_dense, seed):
    model = load_model(tiny_dense)
    T = random.randint(20, 60)
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    full = full_logits(model, ids)
    model.setup_cache(1, T)
    split = random.randint(1, T - 1)
    step = [model(ids[:, :split], torch.arange(split)[None])]
    for t in range(split, T):
        step.append(model(ids[:, t:t + 1], torch.tensor([[t]])))
    stepped = torch.cat(step, dim=1)
    torch.testing.assert_close(stepped, full, atol=FP32_ATOL, rtol=0)


@torch.inference_mode()
def test_batch_equals_one_by_one(tiny_dense, seed):
    model = load_model(tiny_dense)
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    batched = full_logits(model, ids)
    for b in range(3):
        torch.testing.assert_close(batched[b], full_logits(model, ids[b:b + 1])[0], atol=FP32_ATOL, rtol=0)


@torch.inference_mode()
def test_rows_keep_their_own_positions(tiny_dense, seed):
    """Prefill two prompts of different length into rows 0 and 1, then decode both in one step."""
    model = load_model(tiny_dense)
    V = model.config.vocab_size
    a, b = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 14))
    next_a, next_b = torch.randint(0, V, (2,)).tolist()
    model.setup_cache(2, 32)
    model(a, torch.arange(9)[None], first_row=0)
    model(b, torch.arange(14)[None], first_row=1)
    both = model(torch.tensor([[next_a], [next_b]]), torch.tensor([[9], [14]]))[:, 0]
    alone_a = full_logits(model, torch.cat([a, torch.tensor([[next_a]])], 1))[0, -1]
    alone_b = full_logits(model, torch.cat([b, torch.tensor([[next_b]])], 1))[0, -1]
    torch.testing.assert_close(both[0], alone_a, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(both[1], alone_b, atol=FP32_ATOL, rtol=0)


def test_longrope_switches_factors_at_original_max(tiny_dense):
    config = load_config(tiny_dense)
    rs = config.rope_scaling
    d = config.head_dim
    inv_freq = [1.0 / config.rope_theta ** (2 * i / d) for i in range(d // 2)]
    t = 300
    angle_atol = 5e-5  # the fp32 angle t / f * w near 300 rad carries ~3e-5 of rounding
    for capacity, factors, other in ((rs.original_max, rs.short_factor, rs.long_factor),
                                     (rs.original_max + 1, rs.long_factor, rs.short_factor)):
        cos, sin = rope_table(config, capacity)
        expected = [math.cos(t / f * w) for f, w in zip(factors, inv_freq)]
        np.testing.assert_allclose(cos[t].numpy(), expected, atol=angle_atol)
        wrong = [math.cos(t / f * w) for f, w in zip(other, inv_freq)]
        assert np.abs(cos[t].numpy() - wrong).max() > 0.1


def test_longrope_scaling_factor_when_context_was_extended(tiny_dense):
    config = load_config(tiny_dense)
    config.max_position_embeddings = 4 * config.rope_scaling.original_max
    orig = config.rope_scaling.original_max
    scale = math.sqrt(1 + math.log(4) / math.log(orig))  # the formula of MINICPM4.md, by hand
    cos, sin = rope_table(config, 16)
    assert cos[0, 0].item() == pytest.approx(scale, rel=1e-6)
    np.testing.assert_allclose((cos**2 + sin**2).numpy(), scale**2, rtol=1e-5)


@torch.inference_mode()
def test_mup_scalars_by_hand(tiny_dense, seed):
    """With o_proj and down_proj zeroed the layers add nothing, so logits follow from the three scalars:
    lm_head(rmsnorm(embed(ids) * scale_emb) / (hidden / dim_model_base)), computed here in numpy."""
    model = load_model(tiny_dense)
    for layer in model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    c = model.config
    ids = torch.randint(0, c.vocab_size, (1, 5))
    got = full_logits(model, ids)[0].numpy()
    emb = model.embed_tokens.weight.numpy().astype(np.float64)
    h = emb[ids[0].numpy()] * c.scale_emb
    h = h / np.sqrt((h**2).mean(-1, keepdims=True) + c.rms_norm_eps) * model.norm.weight.numpy()
    expected = (h / (c.hidden_size / c.dim_model_base)) @ emb.T  # tied: the embedding is the lm_head
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_residual_scale_by_hand(tiny_dense, seed):
    """One layer whose MLP is the only contributor: h1 = h0 + mlp(norm(h0)) * scale_depth / sqrt(L)."""
    model = load_model(tiny_dense)
    c = model.config
    for layer in model.layers:
        layer.self_attn.o_proj.weight.zero_()
    for layer in model.layers[1:]:
        layer.mlp.down_proj.weight.zero_()
    ids = torch.randint(0, c.vocab_size, (1, 4))
    h0 = model.embed_tokens(ids) * c.scale_emb
    layer = model.layers[0]
    mlp_out = layer.mlp(layer.post_attention_layernorm(h0))
    h1 = h0 + mlp_out * (1.4 / math.sqrt(c.num_hidden_layers))
    expected = model.lm_head(model.norm(h1) / (c.hidden_size / c.dim_model_base))
    torch.testing.assert_close(full_logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_tied_model_shares_one_matrix(tiny_dense):
    model = load_model(tiny_dense)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_untied_model_has_its_own_head(tmp_path):
    path = write_tiny(tmp_path / "untied", seed=3, tie_word_embeddings=False)
    model = load_model(path)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.embed_tokens.weight)


def test_tie_absent_means_tied(tmp_path):
    import json
    path = write_tiny(tmp_path / "m", seed=4)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(path)
    assert model.lm_head.weight is model.embed_tokens.weight


@torch.inference_mode()
def test_sharded_checkpoint_loads_identically(tmp_path, seed):
    single = load_model(write_tiny(tmp_path / "single", seed=seed % 1000))
    sharded_path = write_tiny(tmp_path / "sharded", seed=seed % 1000, shards=3)
    assert (sharded_path / "model.safetensors.index.json").exists()
    assert len(list(sharded_path.glob("model-*-of-00003.safetensors"))) == 3
    sharded = load_model(sharded_path)
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bf16_weights_cast_to_requested_dtype(tiny_dense):
    from safetensors import safe_open
    with safe_open(str(tiny_dense / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert stored.dtype == torch.bfloat16
    for dtype in (torch.float32, torch.float16):
        w = load_model(tiny_dense, dtype).layers[0].self_attn.q_proj.weight
        assert w.dtype == dtype
        torch.testing.assert_close(w, stored.to(dtype))


@pytest.mark.parametrize("name, head_dim, tied, eps", [("MiniCPM4-0.5B", 64, True, 1e-5),
                                                      ("MiniCPM4-8B", 128, False, 1e-6)])
def test_published_configs_parse(name, head_dim, tied, eps):
    """Every key of the released configs is understood (the 0.5B one has no model_type)."""
    import json
    from pathlib import Path

    from export.checkpoint import IGNORED_KEYS, USED_KEYS, config_from_dict

    raw = json.loads((Path(__file__).parent / "data" / "configs" / f"{name}.config.json").read_text())
    assert set(raw) <= USED_KEYS | set(IGNORED_KEYS)
    c = config_from_dict(raw)
    assert (c.head_dim, c.tie_word_embeddings, c.rms_norm_eps) == (head_dim, tied, eps)
    assert (c.scale_emb, c.scale_depth, c.logit_divisor) == (12, 1.4, c.hidden_size / 256)
    assert c.eos_token_ids == [2, 73440] and c.rope_scaling.original_max == 32768
