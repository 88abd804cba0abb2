"""Q4_0 GGUF (export/gguf_export.py --dtype q4_0): the same 4-bit numbers as the kit's int4 export.

Checked against code the kit did not write: gguf-py's own Q4_0 quantizer and dequantizer (the Python port of
ggml's quantize_row_q4_0_ref), and ONNX Runtime's MatMulNBits layout as its contrib-op spec defines it,
decoded here with numpy. llama.cpp's logits on the file need llama-cpp-python (`make bench-cpu` builds it).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf is not installed (the test extra installs it)")

from export.gguf_export import LAYER_TENSORS, q4_0_blocks, rope_pairs_from_halves, write_gguf  # noqa: E402
from trt_plugins.int4.reference import int4_dequantize, quantize_rtn  # noqa: E402

Q4_0 = gguf.GGMLQuantizationType.Q4_0


def test_blocks_equal_gguf_py_quantizer_and_dequantize_to_the_kit_values(seed):
    N, K = random.randint(1, 40), 32 * random.randint(1, 12)
    w = torch.randn(N, K) * torch.rand(N, 1) * 3
    w[0, :32] = 0  # an all-zero block: d = 0, every code 8
    ours = q4_0_blocks(w)
    assert ours.shape == (N, K // 32 * 18) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, gguf.quants.quantize(w.numpy(), Q4_0))
    kit = int4_dequantize(quantize_rtn(w, 32, symmetric=True)).float().numpy()
    np.testing.assert_array_equal(gguf.quants.dequantize(ours, Q4_0), kit)


def onnx_int4_weights(export_dir) -> dict[str, np.ndarray]:
    """Every MatMulNBits weight of a portable export, decoded from the contrib-op layout: B (N, K / block,
    block / 2) uint8 with element 2i in the low nibble, scales (N, K / block), zero point 8 when absent."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(export_dir / "model.onnx")).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}

    def const(name):
        while name not in consts:  # the packed codes reach the node through a Reshape of the initializer
            node = made_by[name]
            assert node.op_type in ("Reshape", "Identity"), node.op_type
            name = node.input[0]
        return consts[name]

    out = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        N, K, block = attrs["N"], attrs["K"], attrs["block_size"]
        assert attrs["bits"] == 4 and len(node.input) == 3  # symmetric: no zero points
        b = const(node.input[1]).reshape(N, K // 2)
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(N, K).astype(np.float32)
        scales = const(node.input[2]).reshape(N, K // block).astype(np.float32)
        out[node.input[2].removesuffix(".scales")] = (codes - 8) * np.repeat(scales, block, axis=1)
    return out


def test_gguf_holds_the_int4_exports_numbers(tiny_dense, tmp_path):
    """`export --weights int4 --group-size 32` and `gguf_export --dtype q4_0` of one folder: every projection
    of every layer dequantizes to exactly the same matrix (after llama.cpp's q/k row order is undone)."""
    from export.checkpoint import load_config
    from export.onnx_export import ExportOptions, export

    out = export(ExportOptions(tiny_dense, tmp_path / "int4", "portable", "fp32", 64, weights="int4",
                               group_size=32, rewrite=False))  # one MatMulNBits per projection, as traced
    theirs = onnx_int4_weights(out)
    path = write_gguf(tiny_dense, tmp_path / "tiny-q4_0.gguf", "q4_0")
    c = load_config(tiny_dense)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    checked = 0
    for i in range(c.num_hidden_layers):
        for hf, name in LAYER_TENSORS.items():
            t = tensors[f"blk.{i}.{name}"]
            if not hf.endswith("_proj.weight"):
                assert t.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
                continue
            assert t.tensor_type == Q4_0
            w = gguf.quants.dequantize(np.asarray(t.data), Q4_0)  # (N, K), llama.cpp's row order
            heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(hf.split(".")[1], 0)
            if heads:  # rope_pairs_from_halves moves whole rows: apply it to the ONNX side's rows too
                np.testing.assert_array_equal(w, rope_pairs_from_halves(theirs[f"model.layers.{i}.{hf[:-7]}"], heads))
            else:
                np.testing.assert_array_equal(w, theirs[f"model.layers.{i}.{hf[:-7]}"])
            checked += 1
    assert checked == 7 * c.num_hidden_layers == len(theirs)


def test_refuses_an_already_quantized_checkpoint(tiny_dense, tmp_path):
    import json
    import shutil

    from export.checkpoint import CheckpointError

    folder = tmp_path / "gptq"
    shutil.copytree(tiny_dense, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="already quantized"):
        write_gguf(folder, tmp_path / "x.gguf", "q4_0")


def test_llama_cpp_runs_the_q4_0_file_near_the_torch_int4_model(tiny_dense, tmp_path):
    """llama.cpp multiplies Q4_0 weights with activations it rounds to 8 bits (Q8_0) on CPU, so its logits
    are near, not equal to, the int4 model's fp32 products."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench-cpu builds it)")
    from export.checkpoint import load_model
    from export.quantized import quantize_model

    path = write_gguf(tiny_dense, tmp_path / "tiny-q4_0.gguf", "q4_0")
    rng = np.random.default_rng(random.randrange(2**31))
    ids = [1] + rng.integers(3, 500, size=47).tolist()
    model = quantize_model(load_model(tiny_dense), 32)
    model.setup_cache(1, 64)
    with torch.inference_mode():
        ours = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0].numpy()  # (T, V)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, n_ubatch=64, logits_all=True, n_threads=2,
                          n_threads_batch=2, type_k=0, type_v=0, seed=0, verbose=False)  # f32 KV cache
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    rel = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    print(f"q4_0: llama.cpp vs torch int4, max relative error {rel:.2e}")
    assert rel < 3e-2
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9
