"""GGUF export (export/gguf_export.py): llama.cpp's logits against `cpm-edge logits` on tiny models, in fp32.

Needs `gguf` and `llama-cpp-python` (`make bench-cpu` installs both); CI builds neither, so these tests skip
with the reason when either is missing.
"""
from __future__ import annotations

import numpy as np
import pytest

from cli.main import main as cpm_edge
from export.tiny import write_tiny

gguf = pytest.importorskip("gguf", reason="gguf is not installed (make bench-cpu installs it)")
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench-cpu builds it)")

from export.gguf_export import rope_pairs_from_halves, write_gguf  # noqa: E402

# Both sides compute in fp32 with different summation orders and RoPE angle rounding (llama.cpp builds
# theta_i by repeated multiplication): 1e-4 of the largest logit, as for the ONNX export.
REL_TOL = 1e-4
N_CTX = 256
GGML_TYPE_F32 = 0

# name -> (write_tiny overrides, prompt length): each a different RoPE / head path through the GGUF keys.
CASES = {
    # max_pos == original, short context: short factors, cos/sin scale 1, tied lm_head
    "tied_short": ({}, 96),
    # max_pos > original: the kit always uses long factors with cos/sin scale sqrt(1 + ln 4 / ln 1024)
    "untied_long_scaled": ({"tie_word_embeddings": False, "max_position_embeddings": 4096}, 96),
    # capacity > original: long factors chosen by context length in both (llama.cpp: n_ctx > original)
    "long_by_capacity": ({"max_position_embeddings": 64}, 200),
}


def torch_logits(model_dir, ids, tmp_path) -> np.ndarray:
    out = tmp_path / "torch.npy"
    assert cpm_edge(["logits", str(model_dir), "--input-ids", ",".join(map(str, ids)), "--out", str(out)]) == 0
    return np.load(out)[0]  # (T, V)


def llama_logits(gguf_path, ids, n_ctx=N_CTX) -> np.ndarray:
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=2,
                          n_threads_batch=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, seed=0, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)  # (T, V)
    finally:
        llm.close()


@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_matches_torch(case, tmp_path):
    overrides, length = CASES[case]
    if "max_position_embeddings" in overrides and overrides["max_position_embeddings"] < 1024:
        original = overrides["max_position_embeddings"]
        from export.tiny import tiny_config
        rs = dict(tiny_config()["rope_scaling"], original_max_position_embeddings=original)
        overrides = dict(overrides, rope_scaling=rs)
    model_dir = write_tiny(tmp_path / "tiny", "dense", seed=5, **overrides)
    path = write_gguf(model_dir, tmp_path / "tiny.gguf", "f32")
    rng = np.random.default_rng(3)
    ids = [1] + rng.integers(3, 500, size=length - 1).tolist()
    ours = torch_logits(model_dir, ids, tmp_path)
    theirs = llama_logits(path, ids)
    rel = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    print(f"{case}: max relative error {rel:.2e} over {len(ids)} positions x {ours.shape[1]} logits")
    assert rel < REL_TOL, f"{case}: llama.cpp differs from torch by {rel:.2e} of the largest logit"
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


def test_f16_export_loads_and_is_close(tiny_dense, tmp_path):
    """f16 matrices: llama.cpp runs them; logits stay near fp32 (checks the f16 path writes sane data)."""
    path = write_gguf(tiny_dense, tmp_path / "tiny-f16.gguf", "f16")
    ids = [1, 17, 99, 250, 3, 42, 7, 480]
    ours = torch_logits(tiny_dense, ids, tmp_path)
    rel = float(np.abs(ours - llama_logits(path, ids)).max() / np.abs(ours).max())
    print(f"f16 GGUF: max relative error {rel:.2e}")
    assert rel < 2e-2


def test_rope_permutation_pairs_halves():
    """Row i and row i + D/2 of each head (a rotate-half pair) end up adjacent, at 2i and 2i + 1."""
    heads, d = 3, 8
    w = np.arange(heads * d, dtype=np.float32)[:, None].repeat(2, axis=1)
    p = rope_pairs_from_halves(w, heads)
    for h in range(heads):
        for i in range(d // 2):
            assert p[h * d + 2 * i, 0] == h * d + i
            assert p[h * d + 2 * i + 1, 0] == h * d + i + d // 2
