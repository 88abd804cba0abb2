"""Build a TensorRT (or TensorRT-RTX) engine from a trt-flavor ONNX graph with the kit's plugins.

Two optimization profiles, both with the cache at the profile's full context:
  0 prefill   batch 1, 1..max_context new tokens (the runtime prefills one row at a time)
  1 decode    1..max_batch rows, one new token each
Networks are strongly typed (TensorRT 11 and TensorRT-RTX know no other kind): the graph's dtypes decide.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from trt_plugins.tensorrt_plugins import import_tensorrt, register_plugins

log = logging.getLogger(__name__)


class EngineBuildError(RuntimeError):
    """The parser or builder refused the graph; the message carries TensorRT's own words."""


@dataclass
class EngineShapes:
    max_batch: int
    max_context: int
    state: list[dict]  # export.json "state": every carried tensor, its per-row shape (KV caches, compressed keys)
    max_prefill: int = 0  # prompt tokens one prefill call takes at most (the profile's prefill_chunk); 0: context

    @classmethod
    def from_export(cls, info: dict, max_batch: int, max_prefill: int | None = None) -> "EngineShapes":
        return cls(max_batch, info["max_seq"], info["state"], max_prefill or 0)

    def profiles(self) -> list[dict[str, tuple]]:
        ctx, b = self.max_context, self.max_batch
        longest = min(self.max_prefill or ctx, ctx)  # the activations TensorRT plans for scale with this
        opt_prefill = min(512, longest)

        def state(spec, batch):
            return (batch, *spec["shape"])  # the KV caches at the export's full context

        prefill = {"input_ids": ((1, 1), (1, opt_prefill), (1, longest)),
                   "positions": ((1, 1), (1, opt_prefill), (1, longest))}
        prefill.update({s["input"]: (state(s, 1), state(s, 1), state(s, 1)) for s in self.state})
        decode = {"input_ids": ((1, 1), (b, 1), (b, 1)), "positions": ((1, 1), (b, 1), (b, 1))}
        decode.update({s["input"]: (state(s, 1), state(s, b), state(s, b)) for s in self.state})
        return [prefill, decode]


class _Logger:
    """Collects TensorRT's messages so a failure can quote them."""

    def __init__(self, trt):
        class Logger(trt.ILogger):
            def __init__(inner):
                trt.ILogger.__init__(inner)
                inner.messages = []

            def log(inner, severity, msg):
                inner.messages.append((severity, msg))
                if severity <= trt.ILogger.Severity.WARNING:
                    log.warning("TensorRT: %s", msg)
        self.logger = Logger()


def build_engine(onnx_path: Path, shapes: EngineShapes, flavour: str = "any", workspace_mb: int = 1024,
                 progress=lambda stage: None) -> tuple[bytes, dict]:
    """Parse, build and serialize; returns the engine bytes and a description for the manifest."""
    trt = import_tensorrt({"tensorrt": "tensorrt", "tensorrt-rtx": "rtx"}.get(flavour, "any"))
    register_plugins(trt)
    logger = _Logger(trt).logger
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    progress(f"parsing {onnx_path.name} with {trt.__name__} {trt.__version__}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise EngineBuildError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: {'; '.join(errors)}")
    plugin_layers = [network.get_layer(i).name for i in range(network.num_layers)
                     if network.get_layer(i).type == trt.LayerType.PLUGIN_V3]
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    # CpmAttention's cache outputs alias its cache inputs (in-place KV update), a preview feature since 10.3.
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    for spec in shapes.profiles():
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    progress(f"building the engine ({len(plugin_layers)} plugin layers, {network.num_layers} layers)")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = [m for s, m in logger.messages if s <= trt.ILogger.Severity.ERROR]
        raise EngineBuildError(f"{onnx_path}: TensorRT could not build an engine: {'; '.join(errors) or 'no reason given'}")
    info = {"tensorrt_module": trt.__name__, "tensorrt_version": trt.__version__,
            "plugin_layers": len(plugin_layers), "layers": network.num_layers,
            "build_seconds": round(time.perf_counter() - start, 2),
            "profiles": json.loads(json.dumps(shapes.profiles()))}
    return bytes(serialized), info


ENGINE_FILE = "engine.plan"


def build_bundle_engine(folder: Path, max_batch: int, flavour: str, progress=lambda stage: None,
                        max_prefill: int | None = None) -> dict:
    """Build folder/engine.plan from the bundle's model.onnx (host or device); returns the manifest fields.
    max_prefill: the longest prefill call (the bundle's prefill_chunk; the backends chunk longer prompts)."""
    import os

    info = json.loads((folder / "export.json").read_text())
    shapes = EngineShapes.from_export(info, max_batch, max_prefill)
    blob, meta = build_engine(folder / "model.onnx", shapes, flavour, progress=progress)
    tmp = folder / f".{ENGINE_FILE}.tmp"
    tmp.write_bytes(blob)
    os.replace(tmp, folder / ENGINE_FILE)
    return {"engine": ENGINE_FILE, "engine_status": "built", "engine_note": None,
            "tensorrt_module": meta["tensorrt_module"], "tensorrt_version": meta["tensorrt_version"],
            "engine_build_seconds": meta["build_seconds"]}


def local_gpu_sm() -> int | None:
    """The SM of GPU 0 from nvidia-smi (Jetsons: from the device tree), or None."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            major, minor = out.stdout.strip().splitlines()[0].split(".")
            return int(major) * 10 + int(minor)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    model = Path("/proc/device-tree/model")
    if model.exists() and "Orin" in model.read_text(errors="ignore"):
        return 87
    return None
