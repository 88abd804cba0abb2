"""The TensorRT plugins' launch plans, executed for real: a trt-flavor export in ONNX Runtime with every
plugin node carried out by its plan (Triton kernels in Triton's interpreter, the arguments, grids and
workspace layout the GPU gets), token for token against the torch model."""
from __future__ import annotations

import random

import pytest

from agent.generation import SamplingParams, generate
from agent.tokenizer import Tokenizer
from cli.model_commands import trt_graph_in_onnxruntime
from cli_helpers import run_cli
from export.checkpoint import load_model
from export.onnx_export import ExportOptions, export
from export.torch_backend import TorchBackend
from export.transforms import use_sparse_attention

MAX_SEQ = 256
# Decode steps: sparse across at least two kernel strides of the tiny sparse_config (stride 8: 18 steps
# complete two or three new kernels, whatever the prompt length); the others a few (the interpreter is
# slow: ~25 s per variant on 2 cores; the sparse one took 113 s with 26 steps).
DECODE = {"sparse": 18, "dense": 8, "ternary": 5, "minicpm5": 5}  # minicpm5: head_dim 128 plans


@pytest.fixture(scope="module")
def trt_exports(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-exports")
    return {v: export(ExportOptions(p, root / v, "trt", "fp32", MAX_SEQ)) for v, p in tiny_models.items()}


@pytest.mark.parametrize("variant", ["dense", "sparse", "ternary", "minicpm5"])
def test_plugin_plans_in_the_interpreter_give_torch_tokens(variant, trt_exports, tiny_models, seed):
    """Two rows batched: the sparse one's prompts cross dense_len (128) and decode goes across several kernel
    strides, so incremental compression, stage 1, selection and block-sparse attention all run."""
    n = random.randint(130, 145) if variant == "sparse" else random.randint(8, 16)
    prompts = [[1] + [random.randrange(3, 500) for _ in range(n)], [1] + [random.randrange(3, 500) for _ in range(n - 5)]]
    params = [SamplingParams(max_tokens=DECODE[variant], temperature=0.0)] * 2
    tokenizer = Tokenizer(tiny_models[variant])
    model = load_model(tiny_models[variant])
    if model.config.sparse is not None:
        use_sparse_attention(model)
    expected = generate(TorchBackend(model, max_batch=2, max_seq=MAX_SEQ), tokenizer, prompts, params)
    backend = trt_graph_in_onnxruntime(trt_exports[variant], "interpreter", max_batch=2)
    got = generate(backend, tokenizer, prompts, params)
    for e, g in zip(expected, got):
        assert g.token_ids == e.token_ids and len(g.token_ids) == DECODE[variant]


def test_cli_generate_with_interpreter_plugins(trt_exports, tiny_models, capsys):
    args = ["--prompt", "Which block?", "--max-tokens", "6", "--temperature", "0"]
    code, torch_text, _ = run_cli(capsys, "generate", tiny_models["dense"], *args)
    assert code == 0 and torch_text.strip()
    code, text, err = run_cli(capsys, "generate", trt_exports["dense"], *args, "--plugins", "interpreter")
    assert code == 0, err
    assert text == torch_text
