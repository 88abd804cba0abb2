"""The onnxruntime backend: runs an export folder (export/onnx_export.py) with numpy + ONNX Runtime only.

The KV cache is one numpy array per layer and kind, (max_batch, Hkv, max_seq, D), allocated once (with any
other state export.json lists: InfLLM v2's compressed keys of a trt-flavor graph). Each call binds a
contiguous slice of rows as both past_* input and present_* output, so ONNX Runtime's GroupQueryAttention
writes the new positions in place: a decode step moves the new keys and values and reads the cache, it
never copies it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from agent.errors import AgentInputError

SUPPORTED_FORMAT = 2
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def state_row_shape(spec: dict, max_seq: int) -> tuple:
    """One batch row of a carried tensor (export.json "state"): KV caches sized to the capacity in use,
    InfLLM v2's compressed keys as exported."""
    kv_heads, length, head_dim = spec["shape"]
    if spec["input"].startswith(("past_key_", "past_value_")):
        length = max_seq
    return kv_heads, length, head_dim


def read_export_info(export_dir: Path) -> dict:
    path = export_dir / "export.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise AgentInputError(f"{path}: not found; is {export_dir} an export folder (cpm-edge export)?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise AgentInputError(f"{path}: cannot read ({e})") from None
    version = info.get("format_version")
    if version != SUPPORTED_FORMAT:
        raise AgentInputError(f"{path}: format_version {version!r} is not the {SUPPORTED_FORMAT} this kit reads; "
                              f"export the model again with this version of cpm-edge")
    return info


class OnnxRuntimeBackend:
    """prefill/decode over an exported graph (the Backend protocol of agent/generation.py)."""

    def __init__(self, export_dir: str | Path, max_batch: int = 1, max_seq: int | None = None,
                 threads: int = 0, session_options=None):
        import onnxruntime as ort

        export_dir = Path(export_dir)
        self.info = info = read_export_info(export_dir)
        if info["logits"] != "last":
            raise AgentInputError(f"{export_dir}: exported with all-position logits; the generation loop needs "
                                  f"an export with --logits last (the default)")
        if info["dtype"] not in NUMPY_DTYPES:
            raise AgentInputError(f"{export_dir}: dtype {info['dtype']} has no ONNX Runtime CPU path; "
                                  f"export with --dtype fp32")
        self.max_batch = max_batch
        self.max_seq = min(max_seq or info["max_seq"], info["max_seq"])
        self.vocab_size = info["vocab_size"]
        so = session_options or ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(export_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises several unrelated types for unusable graphs
            hint = " (a trt-flavor graph needs its custom ops registered)" if info["flavor"] == "trt" else ""
            raise AgentInputError(f"{export_dir / 'model.onnx'}: ONNX Runtime cannot load it{hint}: "
                                  f"{str(e).splitlines()[0]}") from None
        self.caches = [np.zeros((max_batch, *state_row_shape(spec, self.max_seq)), NUMPY_DTYPES[spec["dtype"]])
                       for spec in info["state"]]
        self.cache_names = [spec["input"] for spec in info["state"]]
        self.present_names = [spec["output"] for spec in info["state"]]

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def _run(self, first_row: int, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        rows = slice(first_row, first_row + ids.shape[0])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("positions", np.ascontiguousarray(positions, dtype=np.int64))
        for past, present, cache in zip(self.cache_names, self.present_names, self.caches):
            view = ort.OrtValue.ortvalue_from_numpy(cache[rows])  # contiguous rows: no copy
            binding.bind_ortvalue_input(past, view)
            binding.bind_ortvalue_output(present, view)  # the same buffer: updated in place
        binding.bind_output("logits")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()

    def prefill(self, row: int, ids: np.ndarray, start: int = 0) -> np.ndarray:
        """ids at positions start.. of `row` (start > 0: a later chunk of a prompt, after what the row holds)."""
        ids = np.asarray(ids, dtype=np.int64)[None]
        return self._run(row, ids, np.arange(start, start + ids.shape[1], dtype=np.int64)[None])[0]

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._run(0, np.asarray(tokens)[:, None], np.asarray(positions)[:, None])


def default_threads() -> int:
    return int(os.environ.get("CPM_ORT_THREADS", "0"))
