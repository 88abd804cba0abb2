"""InfLLM v2's second revision (MiniCPM4.1): the torch reference against MiniCPM4.1's own modeling code.

The chain: the official InfLLM v2 code (tests/official/minicpm4_1/modeling_minicpm.py, vendored, unchanged)
runs with CPU stand-ins for its CUDA kernels (tests/official/minicpm4_1/standins.py); each stand-in is first
checked against infllmv2_cuda_impl's own reference (tests/official/infllmv2_cuda_impl/). Then the kit's model
with the reference attention and the same model with every layer's attention done by the official code give
the same logits, prefill and decode, fp32.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import random
import types
from pathlib import Path

import pytest
import torch

from official.infllmv2_cuda_impl.pooling_reference import transform_score
from official.infllmv2_cuda_impl.stage1.complse_online_softmax import compresssed_lse_online_softmax
from official.infllmv2_cuda_impl.utils_reference import (attention_blocksparse_ref, convert_topk_to_base_blockmask,
                                                         prepare_mixed_mask)
from official.minicpm4_1 import standins
from trt_plugins.attention.config import InfLLMv2Config
from trt_plugins.attention.reference import (compress_coarse_keys, compress_keys, update_coarse_keys,
                                             update_compressed_keys)

pytestmark = pytest.mark.filterwarnings("ignore:`is_flash_attn_greater_or_equal_2_10` is deprecated")  # the vendored import
OFFICIAL = Path(__file__).parent / "official" / "minicpm4_1" / "modeling_minicpm.py"
REL_TOL = 1e-4  # max |ours - official| / max |official| on the logits, fp32 (summation order differs)
# The upstream kernels hard-code kernel stride 16, coarse stride 64 and 64-token blocks: keep those, shrink
# the window and top-k so a few hundred tokens already drop blocks: topk 4 + 2 window blocks = 6 places, of
# which init, the own block and the 2 before it are forced, so the best 2 other blocks compete by score.
REV2 = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 128,
        "topk": 4, "use_nope": False, "dense_len": 320, "revision": 2}


# --- the stand-ins against infllmv2_cuda_impl's own references ------------------------------------------
def chunk_means(k0: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """(S, Hkv, D) -> (NK, Hkv, D), as the upstream tests' compress_tensor."""
    return k0.unfold(0, size, stride).mean(dim=-1)


@pytest.mark.parametrize("causal", [True, False])
def test_stage1_standin_equals_compressed_lse_reference(causal, seed):
    S, Hkv, G, D = random.randint(300, 420), 2, random.choice([1, 2, 16]), 64
    q = torch.randn(S if causal else 1, Hkv * G, D)
    k0 = torch.randn(S, Hkv, D)
    k1, k2 = chunk_means(k0, 32, 16), chunk_means(k0, 128, 64)
    ref = compresssed_lse_online_softmax(q, k1, k2, 16, 16, causal=causal)  # (Hkv, Tq, NK)
    cu = lambda n: torch.tensor([0, n], dtype=torch.int32)  # noqa: E731
    got = standins.infllmv2_attn_stage1(q, k1, k2, cu(q.shape[0]), cu(k1.shape[0]), cu(k2.shape[0]), q.shape[0],
                                        k1.shape[0], causal=causal)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(got).all())


def test_pooling_standin_equals_triton_reference(monkeypatch, seed):
    histc = torch.histc  # the reference calls it on int64, which only CUDA's histc takes: count in fp32 here
    monkeypatch.setattr(torch, "histc", lambda x, **kw: histc(x.float(), **kw).to(x.dtype))
    T, Hkv, local, init = random.randint(300, 700), 2, random.randint(1, 3), 1
    nk = (T - 32) // 16 + 1
    score = torch.rand(Hkv, T, nk)
    cu_q, cu_k = torch.tensor([0, T], dtype=torch.int32), torch.tensor([0, nk], dtype=torch.int32)
    got = standins.max_pooling_1d_varlen(score, cu_q, cu_k, torch.zeros(1, dtype=torch.int32), T, nk,
                                         local_blocks=local, init_blocks=init, block_size=64, stride=16)
    ref = transform_score(score, 32, 16, 64, cu_q, cu_k, T, nk, init_blocks=init, local_blocks=local)
    finite = torch.isfinite(got) | torch.isinf(ref)
    # Blocks with no kernel at all (past the end): the CUDA kernel writes -inf, the Triton reference 0.
    assert bool((got[~finite] == float("-inf")).all()) and bool((ref[~finite] == 0).all())
    torch.testing.assert_close(got[finite], ref[finite])


def test_stage2_standins_equal_blocksparse_reference(seed):
    S, Hkv, G, D = random.randint(200, 400), 2, 2, 64
    q, k, v = torch.randn(1, S, Hkv * G, D), torch.randn(1, S, Hkv, D), torch.randn(1, S, Hkv, D)
    cu = torch.tensor([0, S], dtype=torch.int32)
    n_blocks = -(-S // 64)
    topk_idx = torch.stack([torch.randperm(n_blocks)[:3] for _ in range(Hkv * S)]).view(Hkv, S, 3)
    topk_idx[torch.rand(topk_idx.shape) < 0.2] = -1
    topk_idx = topk_idx.int()
    got = standins.infllmv2_attn_varlen_func(q[0], k[0], v[0], cu, cu, S, S, causal=True, topk_idx=topk_idx)
    mask = prepare_mixed_mask(convert_topk_to_base_blockmask(topk_idx, S, 64, "cpu"), cu, cu, S, S, 1,
                              nheads=Hkv * G, nheads_k=Hkv, m_block_dim=1, n_block_dim=64)
    ref, _ = attention_blocksparse_ref(q, k, v, mask, causal=True)
    torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=1e-5)
    dense = standins.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, S, S, causal=True)
    ref, _ = attention_blocksparse_ref(q, k, v, torch.zeros(1, Hkv * G, S, S, dtype=torch.bool), causal=True)
    torch.testing.assert_close(dense, ref[0], rtol=1e-5, atol=1e-5)


# --- the official code around the stand-ins ---------------------------------------------------------------
class OmittedMiniCPMAttention(torch.nn.Module):
    """Stands for the vendored file's omitted base class: only the attributes the InfLLM v2 code reads."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.is_causal = True


def load_official():
    """Execute the vendored module with the kernels' stand-ins and the omitted base class injected."""
    spec = importlib.util.spec_from_file_location("official_minicpm4_1", OFFICIAL)
    module = importlib.util.module_from_spec(spec)
    for name in standins.__all__:
        setattr(module, name, getattr(standins, name))
    module.MiniCPMAttention = OmittedMiniCPMAttention
    spec.loader.exec_module(module)  # its `import flash_attn / infllm_v2` fails here and keeps the stand-ins
    return module


@contextlib.contextmanager
def ties_to_lower_index():
    """torch.topk leaves the order of equal values unspecified (CPU and CUDA differ, and exact ties between
    neighbouring blocks are common: they share a kernel). While this is active, Tensor.topk returns the same
    values with equal ones lower index first, the kit's rule; the official code is otherwise untouched."""
    def topk(self, k, dim=-1, largest=True, sorted=True):
        idx = torch.sort(self, dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
        return torch.return_types.topk((self.gather(dim, idx), idx))

    original = torch.Tensor.topk
    torch.Tensor.topk = topk
    try:
        yield
    finally:
        torch.Tensor.topk = original


class OfficialAttend:
    """A kit layer's attend(q, k_cache, v_cache, q_pos) done by the official code for one batch row: dense
    while kv length < dense_len (the omitted forward's rule), else get_compress_k + sparse_forward (top-k ties:
    see ties_to_lower_index)."""

    def __init__(self, attn, cache):
        self.attn, self.cache = attn, cache

    def __call__(self, q, k, v, q_pos):
        B, H, T, D = q.shape  # (1, H, T, D), k/v (1, Hkv, capacity, D)
        S = int(q_pos.max()) + 1
        q_ = q.transpose(1, 2).reshape(T, H, D)
        k_, v_ = k[:, :, :S].transpose(1, 2), v[:, :, :S].transpose(1, 2)  # (1, S, Hkv, D)
        cu_q, cu_k = torch.tensor([0, T], dtype=torch.int32), torch.tensor([0, S], dtype=torch.int32)
        if S < self.attn.dense_len:
            out = standins.flash_attn_varlen_func(q_, k_[0], v_[0], cu_q, cu_k, T, S, causal=True)
        else:
            ck, ccu, ck2, ccu2 = self.attn.get_compress_k(k_, torch.ones(1, S, dtype=torch.int32), self.cache)
            with ties_to_lower_index():
                out = self.attn.sparse_forward(q_, k_[0], v_[0], cu_q, cu_k, T, S, compressed_k=ck,
                                               compressed_cu_seqlens=ccu, compressed_k2=ck2,
                                               compressed_cu_seqlens2=ccu2)
        return out.view(1, T, H, D).transpose(1, 2)


def rev2_folder(tmp_path, seed):
    from export.tiny import write_tiny

    return write_tiny(tmp_path / "rev2", "sparse", seed=seed, sparse_config=dict(REV2))


def official_model(folder):
    """The kit's model with every layer's attention replaced by the official code (one cache for all)."""
    from export.checkpoint import load_model

    module = load_official()
    raw = json.loads((Path(folder) / "config.json").read_text())
    hf = types.SimpleNamespace(_attn_implementation="flash_attention_2", **raw)
    model = load_model(folder)
    cache = module.InfLLMv2Cache(config=None, num_hidden_layers=len(model.layers))
    for i, layer in enumerate(model.layers):
        layer.self_attn.attend = OfficialAttend(module.MiniCPMInfLLMv2Attention(hf, i), cache)
    return model


def kit_model(folder):
    from export.checkpoint import load_model
    from export.transforms import use_sparse_attention

    model = load_model(folder)
    assert model.config.sparse.revision == 2
    return use_sparse_attention(model)


def assert_logits_close(ours, official):
    rel = float((ours - official).abs().max() / official.abs().max())
    assert rel < REL_TOL, rel


@pytest.mark.parametrize("T", [REV2["dense_len"] - 1, REV2["dense_len"], 451, 640])
def test_prefill_matches_official_code(T, tmp_path, seed):
    folder = rev2_folder(tmp_path, seed)
    ids = torch.randint(3, 500, (1, T))
    with torch.inference_mode():
        ours, official = kit_model(folder), official_model(folder)
        for m in (ours, official):
            m.setup_cache(1, T)
        assert_logits_close(ours(ids, torch.arange(T)[None]), official(ids, torch.arange(T)[None]))


@pytest.mark.parametrize("P, steps", [(REV2["dense_len"] - 20, 60), (REV2["dense_len"] + 37, 100)])
def test_decode_matches_official_code(P, steps, tmp_path, seed):
    """Prefill P tokens, then decode one at a time: across dense_len (the whole cache compressed once) from
    below it; from above it, across two coarse-key strides (64) and six kernel strides (16)."""
    folder = rev2_folder(tmp_path, seed)
    T = P + steps
    ids = torch.randint(3, 500, (1, T))
    with torch.inference_mode():
        ours, official = kit_model(folder), official_model(folder)
        for m in (ours, official):
            m.setup_cache(1, T)
        assert_logits_close(ours(ids[:, :P], torch.arange(P)[None]), official(ids[:, :P], torch.arange(P)[None]))
        for t in range(P, T):
            pos = torch.tensor([[t]])
            assert_logits_close(ours(ids[:, t:t + 1], pos), official(ids[:, t:t + 1], pos))


# --- the reference on its own ----------------------------------------------------------------------------
def test_prefill_equals_decode_and_differs_from_revision_1(tmp_path, seed):
    from export.checkpoint import load_model
    from export.transforms import use_sparse_attention

    folder = rev2_folder(tmp_path, seed)
    T, P = 440, 330
    ids = torch.randint(3, 500, (1, T))
    with torch.inference_mode():
        model = kit_model(folder)
        model.setup_cache(1, T)
        full = model(ids, torch.arange(T)[None])
        model.setup_cache(1, T)
        steps = [model(ids[:, :P], torch.arange(P)[None])]
        steps += [model(ids[:, t:t + 1], torch.tensor([[t]])) for t in range(P, T)]
        torch.testing.assert_close(torch.cat(steps, 1)[:, P:], full[:, P:], atol=2e-4, rtol=0)
        rev1 = load_model(folder)
        rev1.config.sparse = InfLLMv2Config(**{**REV2, "revision": 1})
        use_sparse_attention(rev1)
        rev1.setup_cache(1, T)
        # Past 384 the window's lower block is forced in revision 2 but only a candidate in revision 1: most
        # of those rows (not necessarily the last one) pick different blocks.
        differs = (rev1(ids, torch.arange(T)[None])[0] - full[0]).abs().amax(dim=-1) > 1e-3
        assert int(differs[384:].sum()) >= 10 and not bool(differs[:REV2["dense_len"]].any())


def test_incremental_key_sets_equal_full_compression(seed):
    cfg = InfLLMv2Config(**REV2)
    k = torch.randn(1, 2, random.randint(300, 500), 16)
    kc = torch.full((1, 2, k.shape[2] // 16, 16), float("nan"))  # poisoned: every completed chunk is written
    kc2 = torch.full((1, 2, k.shape[2] // 64, 16), float("nan"))
    length = 0
    while length < k.shape[2]:
        new = min(k.shape[2], length + random.choice([1, 1, 3, 70]))
        pos = torch.arange(length, new)[None]
        kc, kc2 = update_compressed_keys(kc, k, pos, cfg), update_coarse_keys(kc2, k, pos, cfg)
        length = new
    full, full2 = compress_keys(k, cfg), compress_coarse_keys(k, cfg)
    torch.testing.assert_close(kc[:, :, :full.shape[2]], full)
    torch.testing.assert_close(kc2[:, :, :full2.shape[2]], full2)


def test_revision_read_from_config_and_validated(tmp_path):
    from export.checkpoint import load_config
    from export.tiny import write_tiny

    assert load_config(write_tiny(tmp_path / "r1", "sparse")).sparse.revision == 1  # no key: MiniCPM4
    cfg = load_config(write_tiny(tmp_path / "r2", "sparse", sparse_config=dict(REV2))).sparse
    assert (cfg.revision, cfg.lse_kernel_size, cfg.lse_kernel_stride, cfg.max_selected) == (2, 128, 64, 6)
    with pytest.raises(Exception, match="revision"):
        load_config(write_tiny(tmp_path / "r3", "sparse", sparse_config={**REV2, "revision": 3}))


def test_portable_export_runs_revision_2_and_the_kernels_refuse_it(tmp_path):
    """The portable ONNX flavor traces the reference's selection (revision 2 here) into standard ops: ONNX
    Runtime's greedy tokens equal the torch model's past dense_len. The trt flavor and use_sparse_attention's
    triton impl still refuse it (the kernels and plans run it: tests/test_infllm_v2_rev2_kernels.py)."""
    from agent.generation import SamplingParams, generate
    from agent.onnxruntime_backend import OnnxRuntimeBackend
    from agent.tokenizer import Tokenizer
    from export.checkpoint import CheckpointError
    from export.onnx_export import ExportOptions, export
    from export.torch_backend import TorchBackend
    from export.transforms import use_sparse_attention
    folder = rev2_folder(tmp_path, random.randrange(1000))
    out = export(ExportOptions(folder, tmp_path / "portable", "portable", "fp32", 512))
    assert json.loads((out / "export.json").read_text())["sparse_config"]["revision"] == 2
    prompt = [1] + [random.randrange(3, 500) for _ in range(random.randint(340, 400))]  # past dense_len 320
    params = [SamplingParams(max_tokens=12)]
    tok = Tokenizer(folder)
    ours = generate(OnnxRuntimeBackend(out, max_batch=1), tok, [prompt], params)[0].token_ids
    want = generate(TorchBackend(kit_model(folder), max_batch=1, max_seq=512), tok, [prompt], params)[0].token_ids
    assert ours == want

    with pytest.raises(CheckpointError, match="revision 2 .* portable flavor only"):
        export(ExportOptions(folder, tmp_path / "trt", "trt", "fp32", 512))
    from export.checkpoint import load_model
    with pytest.raises(ValueError, match="revision 1 only"):
        use_sparse_attention(load_model(folder), impl="triton")
