"""GPU memory, measured where it lives: NVML on a discrete GPU, tegrastats on a Jetson, the CUDA driver else.

A process's resident set (ru_maxrss, VmRSS) does not hold what cudaMalloc or TensorRT allocate on a discrete
GPU, and on a Jetson the GPU shares the system's memory, so the agent's GPU share shows only in system-wide
figures. Sources, in the order tried:
  tegrastats  Jetson (unified memory): system RAM in use; the agent's share is peak minus the baseline taken
              before the model loaded
  nvml        discrete GPU (nvidia-ml-py): this process's own allocation when the driver lists it, else the
              device's memory in use (peak minus baseline)
  cuda        the CUDA driver's cuMemGetInfo (cuda-python): the device's memory in use (peak minus baseline)
With none of them (no NVIDIA GPU) the report says so; host memory (peak RSS) is reported apart, as host memory.
"""
from __future__ import annotations

import logging
import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from agent.health import Tegrastats

log = logging.getLogger("cpm-edge.agent")


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists() or "nvidia" in _device_tree_compatible()


def _device_tree_compatible() -> str:
    try:
        return Path("/proc/device-tree/compatible").read_bytes().decode(errors="replace").lower()
    except OSError:
        return ""


class _Tegrastats:
    scope = "system"

    def __init__(self, binary: str):
        self.stats = Tegrastats(interval_ms=100, binary=binary)
        if not self.stats.start():
            raise OSError(f"{binary} did not start")
        deadline = time.monotonic() + 3
        while self.stats.figures() is None and time.monotonic() < deadline:  # the first line takes ~interval
            time.sleep(0.05)
        if self.stats.figures() is None or "ram_used_mb" not in self.stats.figures():
            self.stats.stop()
            raise OSError(f"{binary} printed no RAM figure")

    def read(self) -> tuple[int, int, Optional[int]]:
        f = self.stats.figures() or {}
        return f.get("ram_used_mb", 0) * 2**20, f.get("ram_total_mb", 0) * 2**20, None

    def close(self):
        self.stats.stop()


class _Nvml:
    scope = "device"

    def __init__(self):
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if not self.handles:
            pynvml.nvmlShutdown()
            raise OSError("NVML sees no device")
        self.pid = os.getpid()

    def read(self) -> tuple[int, int, Optional[int]]:
        used = total = 0
        own = None
        for h in self.handles:
            info = self.nvml.nvmlDeviceGetMemoryInfo(h)
            used, total = used + info.used, total + info.total
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                if proc.pid == self.pid and proc.usedGpuMemory is not None:
                    own = (own or 0) + proc.usedGpuMemory
        return used, total, own

    def close(self):
        self.nvml.nvmlShutdown()


class _CudaDriver:
    """cuMemGetInfo needs a current context: the primary context of device 0, the one the runtime uses."""
    scope = "device"

    def __init__(self):
        from cuda.bindings import driver  # cuda-python

        self.driver = driver
        self._check(driver.cuInit(0))
        (self.device,) = self._check(driver.cuDeviceGet(0))
        (self.context,) = self._check(driver.cuDevicePrimaryCtxRetain(self.device))

    def _check(self, result):
        err, *values = result
        if err != self.driver.CUresult.CUDA_SUCCESS:
            raise OSError(f"CUDA driver: {err}")
        return values

    def read(self) -> tuple[int, int, Optional[int]]:
        self._check(self.driver.cuCtxSetCurrent(self.context))
        free, total = self._check(self.driver.cuMemGetInfo())
        return total - free, total, None

    def close(self):
        self.driver.cuDevicePrimaryCtxRelease(self.device)


def open_source(order: tuple[str, ...] = ("tegrastats", "nvml", "cuda"), tegrastats: Optional[str] = None):
    """(name, source) of the first source that answers here, or (None, reasons) when none does. `tegrastats`
    names the binary (default: the Jetson's, found on PATH)."""
    makers: dict[str, Callable] = {
        "tegrastats": lambda: _Tegrastats(tegrastats or shutil.which("tegrastats")),
        "nvml": _Nvml,
        "cuda": _CudaDriver,
    }
    reasons = []
    for name in order:
        if name == "tegrastats" and not tegrastats and not (is_jetson() and shutil.which("tegrastats")):
            reasons.append("tegrastats: not a Jetson")
            continue
        try:
            return name, makers[name]()
        except ImportError as e:
            reasons.append(f"{name}: {e.name or e} is not installed")
        except Exception as e:  # each binding raises its own error types (NVMLError, OSError, ...)
            reasons.append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
    return None, reasons


class GpuMemory:
    """Samples GPU memory in a background thread from before the model loads until stop(); keeps the peak."""

    def __init__(self, interval_s: float = 0.1, order: tuple[str, ...] = ("tegrastats", "nvml", "cuda"),
                 tegrastats: Optional[str] = None):
        self.interval_s = interval_s
        self.name, self.source = open_source(order, tegrastats)
        self.baseline = self.peak = self.total = 0
        self.own_peak: Optional[int] = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def available(self) -> bool:
        return self.name is not None

    def start(self) -> "GpuMemory":
        if self.available:
            self.baseline, self.total, _ = self.source.read()
            self.peak = self.baseline
            self._thread = threading.Thread(target=self._run, name="cpm-gpu-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        used, total, own = self.source.read()
        self.samples += 1
        self.peak, self.total = max(self.peak, used), total or self.total
        if own is not None:
            self.own_peak = max(self.own_peak or 0, own)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception:  # a driver hiccup must not end the test; the next sample may work
                log.debug("GPU memory sample failed", exc_info=True)

    def stop(self) -> dict:
        """The report: source, scope, baseline, peak and the share attributed to this process (GB, 1e9)."""
        if not self.available:
            return {"source": None, "measured": False,
                    "note": "no GPU memory source here (" + "; ".join(self.source) + ")"}
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self._sample()
        except Exception:
            log.debug("last GPU memory sample failed", exc_info=True)
        self.source.close()
        if self.own_peak is not None:
            scope, attributed = "process", self.own_peak
        else:
            scope, attributed = self.source.scope, max(0, self.peak - self.baseline)
        return {"source": self.name, "measured": True, "scope": scope, "samples": self.samples,
                "baseline_gb": self.baseline / 1e9, "peak_gb": self.peak / 1e9, "total_gb": self.total / 1e9,
                "used_by_agent_gb": attributed / 1e9}


def host_memory() -> dict:
    """This process's peak resident set: host memory (on a Jetson it includes what the CPU side holds)."""
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
