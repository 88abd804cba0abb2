"""The tensorrt backend: an engine bundle (cpm-edge engine) on the device, with CUDA through cuda-python.

Before deserializing, the bundle is checked against this GPU and this TensorRT; a build-on-device bundle
gets its engine built and cached on first start. The carried state (export.json "state": KV caches of
(max_batch, Hkv, max_context, D) per layer, and InfLLM v2's compressed keys) lives in device buffers; every
call binds the rows it works on as both the past and present tensors (CpmAttention aliases them, so the
plugin writes in place). Two execution contexts: optimization profile 0 for prefill (one row, many tokens)
and 1 for decode (all rows, one token each). Decode steps are captured once per batch size in a CUDA graph
and replayed.

CUDA runtime calls go through cuda-python (`cuda.bindings.runtime`): its runtime API uses the device's
primary context on whichever thread calls, the one TensorRT and the plugins' executor use too, so the agent's
scheduler thread needs no context juggling. Tested only on an NVIDIA device (make test-device).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
from pathlib import Path

import numpy as np

from agent.bundle_check import BundleError, build_into_state, check_device, engine_file, read_manifest, update_manifest

log = logging.getLogger(__name__)
STATE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _cuda(result, call: str):
    """The value of a cuda-python call, or a RuntimeError naming the call and CUDA's error."""
    err, *values = result
    if int(err) != 0:
        raise RuntimeError(f"{call}: CUDA error {int(err)} ({err})")
    return values[0] if len(values) == 1 else None


class PinnedArray:
    """Page-locked host memory as a numpy array (cudaMallocHost), for asynchronous copies."""

    def __init__(self, cudart, shape, dtype):
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = _cuda(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost")
        self.array = np.frombuffer((ctypes.c_char * self.nbytes).from_address(int(self.ptr)), dtype).reshape(shape)


class TensorRTBackend:
    def __init__(self, bundle: str | Path, max_batch: int | None = None, build_missing: bool = True,
                 state_dir: str | Path | None = None):
        from trt_plugins.engine_builder import build_bundle_engine
        from trt_plugins.tensorrt_plugins import KERNEL_DIR_ENV, import_tensorrt, register_plugins

        from cuda.bindings import runtime as cudart  # cuda-bindings: the device's CUDA dependency

        self.bundle = Path(bundle)
        manifest = read_manifest(self.bundle)  # sizes and hashes were checked by open_bundle (check_at_start)
        trt = import_tensorrt("tensorrt" if manifest["trt_flavour"] == "tensorrt" else "rtx")
        self.cudart, self.trt = cudart, trt
        props = _cuda(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
        check_device(manifest, props.major * 10 + props.minor, trt.__version__)
        os.environ[KERNEL_DIR_ENV] = str(self.bundle / "kernels")
        register_plugins(trt)
        engine = engine_file(self.bundle, manifest, state_dir)  # the bundle's, else one this device built
        if engine is None:
            if not build_missing:
                raise BundleError(f"{self.bundle}: no engine yet; build it here: cpm-edge engine build --bundle "
                                  f"{self.bundle}" + (f" --state-dir {state_dir}" if state_dir else ""))
            if state_dir is not None:  # the bundle stays read-only: the engine goes into the state folder
                log.info("building the engine for this device (first start) into %s", state_dir)
                build_into_state(self.bundle, Path(state_dir), manifest)
                engine = engine_file(self.bundle, manifest, state_dir)
            else:
                log.info("building the engine for this device (first start); it is kept in the bundle")
                manifest = update_manifest(self.bundle, **build_bundle_engine(
                    self.bundle, manifest["max_batch"], manifest["trt_flavour"], max_prefill=manifest.get("prefill_chunk")))
                engine = self.bundle / manifest["engine"]
        self.manifest = manifest
        self.max_batch = min(max_batch or manifest["max_batch"], manifest["max_batch"])
        self.max_seq = manifest["max_context"]
        self.info = json.loads((self.bundle / "export.json").read_text())
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(engine.read_bytes())
        if self.engine is None:
            raise BundleError(f"{engine}: TensorRT could not deserialize it; rebuild it here: cpm-edge engine build "
                              f"--bundle {self.bundle}" + (f" --state-dir {state_dir}" if state_dir else ""))
        # the longest prefill call the engine's prefill profile (0) takes: the bundle's prefill_chunk
        self.max_prefill = int(self.engine.get_tensor_profile_shape("input_ids", 0)[2][1])
        self.stream = int(_cuda(cudart.cudaStreamCreate(), "cudaStreamCreate"))
        self.prefill_context = self.engine.create_execution_context()
        self.prefill_context.set_optimization_profile_async(0, self.stream)
        self.decode_context = self.engine.create_execution_context()
        self.decode_context.set_optimization_profile_async(1, self.stream)
        self.state = [dict(spec, row_bytes=int(np.prod(spec["shape"])) * STATE_BYTES[spec["dtype"]])
                      for spec in self.info["state"]]
        self.buffers = [self._malloc(self.max_batch * spec["row_bytes"]) for spec in self.state]
        self.ids, self.positions = self._malloc(self.max_seq * 8), self._malloc(self.max_seq * 8)
        self.vocab = self.info["vocab_size"]
        self.logits = self._malloc(self.max_batch * self.vocab * 4)
        self.host_logits = PinnedArray(cudart, (self.max_batch, self.vocab), np.float32)
        self.host_ids = PinnedArray(cudart, (self.max_seq,), np.int64)
        self.host_positions = PinnedArray(cudart, (self.max_seq,), np.int64)
        self.graphs: dict[int, object] = {}

    def _malloc(self, nbytes: int) -> int:
        ptr = int(_cuda(self.cudart.cudaMalloc(nbytes), "cudaMalloc"))
        _cuda(self.cudart.cudaMemset(ptr, 0, nbytes), "cudaMemset")
        return ptr

    def _bind(self, context, first_row: int, batch: int, tokens: int):
        context.set_input_shape("input_ids", (batch, tokens))
        context.set_input_shape("positions", (batch, tokens))
        context.set_tensor_address("input_ids", self.ids)
        context.set_tensor_address("positions", self.positions)
        for spec, buffer in zip(self.state, self.buffers):
            address = buffer + first_row * spec["row_bytes"]
            context.set_input_shape(spec["input"], (batch, *spec["shape"]))
            context.set_tensor_address(spec["input"], address)
            context.set_tensor_address(spec["output"], address)  # aliased: written in place
        context.set_tensor_address("logits", self.logits)

    def _copy(self, dst: int, src: int, nbytes: int, kind):
        _cuda(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream), "cudaMemcpyAsync")

    def _upload(self, ids: np.ndarray, positions: np.ndarray):
        n = ids.size
        self.host_ids.array[:n] = ids.reshape(-1)
        self.host_positions.array[:n] = positions.reshape(-1)
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._copy(self.ids, int(self.host_ids.ptr), n * 8, h2d)
        self._copy(self.positions, int(self.host_positions.ptr), n * 8, h2d)

    def _download(self, rows: int) -> np.ndarray:
        self._copy(int(self.host_logits.ptr), self.logits, rows * self.vocab * 4,
                   self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        _cuda(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return np.array(self.host_logits.array[:rows])

    def prefill(self, row: int, ids: np.ndarray, start: int = 0) -> np.ndarray:
        """ids at positions start.. of `row` (a later chunk of a prompt when start > 0). The engine's prefill
        profile takes at most max_prefill tokens a call; longer runs go in calls of that size."""
        ids = np.asarray(ids, dtype=np.int64)
        step = self.max_prefill
        for first in range(0, ids.size, step):
            part = ids[first:first + step]
            self._upload(part, np.arange(start + first, start + first + part.size, dtype=np.int64))
            self._bind(self.prefill_context, row, 1, part.size)
            if not self.prefill_context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT prefill failed (see the TensorRT log above)")
        return self._download(1)[0]

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        n = len(tokens)
        self._upload(np.asarray(tokens, np.int64), np.asarray(positions, np.int64))
        graph = self.graphs.get(n)
        if graph is not None:
            _cuda(self.cudart.cudaGraphLaunch(graph, self.stream), "cudaGraphLaunch")
        else:
            self._bind(self.decode_context, 0, n, 1)
            if not self.decode_context.execute_async_v3(self.stream):
                raise RuntimeError("TensorRT decode failed (see the TensorRT log above)")
            if n not in self.graphs:
                self._capture(n)
        return self._download(n)

    def _capture(self, n: int):
        """Record this batch size's decode step as a CUDA graph (inputs live in fixed buffers; the plugins
        launch on the captured stream without allocating). A step that cannot be captured keeps plain launches."""
        cudart = self.cudart
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        try:
            _cuda(cudart.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
            ok = self.decode_context.execute_async_v3(self.stream)
            graph = _cuda(cudart.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
            if not ok:
                raise RuntimeError("execute_async_v3 refused to run under capture")
            self.graphs[n] = _cuda(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except RuntimeError as e:
            log.warning("decode of %d rows is not captured in a CUDA graph: %s", n, e)
            self.graphs[n] = None
