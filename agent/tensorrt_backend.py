"""The tensorrt backend: an engine bundle (cpm-edge engine) on the device, with pycuda buffers.

Before deserializing, the bundle is verified (sha256 of every file) and checked against this GPU and this
TensorRT; a build-on-device bundle gets its engine built and cached on first start. The KV caches are device
buffers of (max_batch, Hkv, max_context, D) per layer; every call binds the rows it works on as both the past
and present tensors (CpmAttention aliases them, so the plugin writes the new positions in place). Two
execution contexts: optimization profile 0 for prefill (one row, many tokens) and 1 for decode (all rows, one
token each). Decode steps are captured once per batch size in a CUDA graph and replayed when pycuda can
capture streams.

Tested only on an NVIDIA device (make test-device); this machine class has no GPU.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from agent.bundle_check import BundleError, check_device, read_manifest, update_manifest, verify_files

log = logging.getLogger(__name__)


class TensorRTBackend:
    def __init__(self, bundle: str | Path, max_batch: int | None = None, build_missing: bool = True):
        from trt_plugins.engine_builder import build_bundle_engine
        from trt_plugins.tensorrt_plugins import KERNEL_DIR_ENV, import_tensorrt, register_plugins

        self.bundle = Path(bundle)
        manifest = read_manifest(self.bundle)
        verify_files(self.bundle, manifest)
        trt = import_tensorrt("tensorrt" if manifest["trt_flavour"] == "tensorrt" else "rtx")
        import pycuda.autoinit  # noqa: F401
        import pycuda.driver as cuda

        self.cuda, self.trt = cuda, trt
        major, minor = cuda.Device(0).compute_capability()
        check_device(manifest, major * 10 + minor, trt.__version__)
        os.environ[KERNEL_DIR_ENV] = str(self.bundle / "kernels")
        register_plugins(trt)
        if not manifest.get("engine"):
            if not build_missing:
                raise BundleError(f"{self.bundle}: no engine yet; build it here: cpm-edge engine build --bundle "
                                  f"{self.bundle}")
            log.info("building the engine for this device (first start); it is cached in the bundle")
            manifest = update_manifest(self.bundle, **build_bundle_engine(self.bundle, manifest["max_batch"],
                                                                          manifest["trt_flavour"]))
        self.manifest = manifest
        self.max_batch = min(max_batch or manifest["max_batch"], manifest["max_batch"])
        self.max_seq = manifest["max_context"]
        self.info = json.loads((self.bundle / "export.json").read_text())
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine((self.bundle / manifest["engine"]).read_bytes())
        if self.engine is None:
            raise BundleError(f"{self.bundle / manifest['engine']}: TensorRT could not deserialize it; rebuild it "
                              f"here: cpm-edge engine build --bundle {self.bundle}")
        self.stream = cuda.Stream()
        self.prefill_context = self.engine.create_execution_context()
        self.prefill_context.set_optimization_profile_async(0, self.stream.handle)
        self.decode_context = self.engine.create_execution_context()
        self.decode_context.set_optimization_profile_async(1, self.stream.handle)
        kv, d = self.info["num_kv_heads"], self.info["head_dim"]
        self.row_bytes = kv * self.max_seq * d * 2  # fp16/bf16
        self.cache_names = list(zip(self.info["inputs"][2:], self.info["outputs"][1:]))
        self.caches = [cuda.mem_alloc(self.max_batch * self.row_bytes) for _ in self.cache_names]
        self.ids = cuda.mem_alloc(self.max_seq * 8)
        self.positions = cuda.mem_alloc(self.max_seq * 8)
        self.vocab = self.info["vocab_size"]
        self.logits = cuda.mem_alloc(self.max_batch * self.vocab * 4)
        self.host_logits = cuda.pagelocked_empty((self.max_batch, self.vocab), np.float32)
        self.host_ids = cuda.pagelocked_empty(self.max_seq, np.int64)
        self.host_positions = cuda.pagelocked_empty(self.max_seq, np.int64)
        self.graphs: dict[int, object] = {}

    def _bind(self, context, first_row: int, batch: int, tokens: int):
        context.set_input_shape("input_ids", (batch, tokens))
        context.set_input_shape("positions", (batch, tokens))
        context.set_tensor_address("input_ids", int(self.ids))
        context.set_tensor_address("positions", int(self.positions))
        kv, d = self.info["num_kv_heads"], self.info["head_dim"]
        for (past, present), buffer in zip(self.cache_names, self.caches):
            address = int(buffer) + first_row * self.row_bytes
            context.set_input_shape(past, (batch, kv, self.max_seq, d))
            context.set_tensor_address(past, address)
            context.set_tensor_address(present, address)  # aliased: written in place
        context.set_tensor_address("logits", int(self.logits))

    def _upload(self, ids: np.ndarray, positions: np.ndarray):
        n = ids.size
        self.host_ids[:n] = ids.reshape(-1)
        self.host_positions[:n] = positions.reshape(-1)
        self.cuda.memcpy_htod_async(self.ids, self.host_ids[:n], self.stream)
        self.cuda.memcpy_htod_async(self.positions, self.host_positions[:n], self.stream)

    def _download(self, rows: int) -> np.ndarray:
        self.cuda.memcpy_dtoh_async(self.host_logits[:rows], self.logits, self.stream)
        self.stream.synchronize()
        return np.array(self.host_logits[:rows])

    def prefill(self, row: int, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        self._upload(ids, np.arange(ids.size, dtype=np.int64))
        self._bind(self.prefill_context, row, 1, ids.size)
        if not self.prefill_context.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT prefill failed (see the TensorRT log above)")
        return self._download(1)[0]

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        n = len(tokens)
        self._upload(np.asarray(tokens, np.int64), np.asarray(positions, np.int64))
        graph = self.graphs.get(n)
        if graph is not None:
            graph.launch(self.stream)
        else:
            self._bind(self.decode_context, 0, n, 1)
            if not self.decode_context.execute_async_v3(self.stream.handle):
                raise RuntimeError("TensorRT decode failed (see the TensorRT log above)")
            if n not in self.graphs:
                self._capture(n)
        return self._download(n)

    def _capture(self, n: int):
        """Record this batch size's decode step as a CUDA graph (inputs live in fixed buffers)."""
        begin = getattr(self.stream, "begin_capture", None)
        if begin is None:
            self.graphs[n] = None  # this pycuda cannot capture streams: plain launches
            return
        try:
            begin()
            self.decode_context.execute_async_v3(self.stream.handle)
            self.graphs[n] = self.stream.end_capture().instance()
        except Exception as e:  # a plugin or driver that cannot be captured: keep plain launches
            log.warning("decode of %d rows is not captured in a CUDA graph: %s", n, e)
            self.graphs[n] = None
