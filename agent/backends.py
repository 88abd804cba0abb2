"""Open what the agent serves: an export folder (onnxruntime backend) or an engine bundle (tensorrt backend).
Returns the backend, its tokenizer and a description for status/telemetry."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from agent.errors import AgentInputError
from agent.tokenizer import Tokenizer


def open_bundle(path: str | Path, max_batch: int = 4, max_seq: int | None = None, threads: int = 0,
                state_dir: str | Path | None = None):
    """(backend, tokenizer, info) for an engine bundle (cpm-edge engine; it has manifest.json) or an export
    folder (cpm-edge export). state_dir: where this device keeps engines it built (the unit's StateDirectory)."""
    path = Path(path)
    if not path.is_dir():
        raise AgentInputError(f"{path}: not a directory (expected an export folder from cpm-edge export)")
    if (path / "manifest.json").exists():
        from agent.bundle_check import check_at_start

        # Before anything needs a GPU: cheap when `flash`/`bundle verify` recorded a full sha256 pass, else full.
        manifest = check_at_start(path)
        if manifest.get("backend") == "onnxruntime":  # a devices/cpu bundle: the portable graph as it is
            from agent.onnxruntime_backend import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend(path, max_batch=min(max_batch, manifest["max_batch"]), max_seq=max_seq,
                                         threads=threads)
            return backend, Tokenizer(path), {"backend": "onnxruntime",
                                              **{k: v for k, v in manifest.items() if k != "files"}}
        if not manifest.get("engine") and state_dir is None and not os.access(path, os.W_OK):
            # without a state folder the first-start build writes into the bundle, which is read-only here
            cpm = Path(sys.executable).with_name("cpm-edge")
            raise AgentInputError(f"{path}: no engine yet, and the bundle is read-only here; build it on this "
                                  f"device as root: sudo {cpm} engine build --bundle {path} (or flash again: the "
                                  f"flash builds it on the device)")
        from agent.tensorrt_backend import TensorRTBackend
        from trt_plugins.tensorrt_plugins import TensorRTMissing
        try:
            backend = TensorRTBackend(path, max_batch=max_batch, state_dir=state_dir)
        except ImportError as e:
            raise AgentInputError(f"{path}: an engine bundle needs TensorRT and cuda-python (cuda-bindings) on an "
                                  f"NVIDIA device ({e.name or e} is not importable here)") from None
        except TensorRTMissing as e:
            raise AgentInputError(f"{path}: {e}") from None
        return backend, Tokenizer(path), {"backend": "tensorrt", **{k: v for k, v in manifest.items() if k != "files"}}
    if (path / "export.json").exists():
        from agent.onnxruntime_backend import OnnxRuntimeBackend, read_export_info

        info = read_export_info(path)
        if info["flavor"] != "portable":
            raise AgentInputError(f"{path}: a {info['flavor']}-flavor export runs under TensorRT; the onnxruntime "
                                  f"backend needs one made with --flavor portable")
        backend = OnnxRuntimeBackend(path, max_batch=max_batch, max_seq=max_seq, threads=threads)
        return backend, Tokenizer(path), {"backend": "onnxruntime", **info}
    raise AgentInputError(f"{path}: neither export.json nor manifest.json; make an export folder with "
                          f"`cpm-edge export MODEL_DIR --out {path}` or a bundle with `cpm-edge engine`")
