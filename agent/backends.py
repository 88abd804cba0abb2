"""Open what the agent serves: an export folder (onnxruntime backend) today; engine bundles come with the
tensorrt backend. Returns the backend, its tokenizer and a description for status/telemetry."""
from __future__ import annotations

from pathlib import Path

from agent.errors import AgentInputError
from agent.tokenizer import Tokenizer


def open_bundle(path: str | Path, max_batch: int = 4, max_seq: int | None = None, threads: int = 0):
    """(backend, tokenizer, info) for a folder made by `cpm-edge export`."""
    path = Path(path)
    if not path.is_dir():
        raise AgentInputError(f"{path}: not a directory (expected an export folder from cpm-edge export)")
    if (path / "export.json").exists():
        from agent.onnxruntime_backend import OnnxRuntimeBackend, read_export_info

        info = read_export_info(path)
        if info["flavor"] != "portable":
            raise AgentInputError(f"{path}: a {info['flavor']}-flavor export runs under TensorRT; the onnxruntime "
                                  f"backend needs one made with --flavor portable")
        backend = OnnxRuntimeBackend(path, max_batch=max_batch, max_seq=max_seq, threads=threads)
        return backend, Tokenizer(path), {"backend": "onnxruntime", **info}
    raise AgentInputError(f"{path}: no export.json; make one with `cpm-edge export MODEL_DIR --out {path}`")
