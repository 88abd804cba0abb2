"""The GPU executor of a launch plan: the AOT cubins of `cpm-edge kernels compile` launched with the CUDA driver
API (cuda-python's `cuda.bindings.driver`) on the stream TensorRT hands the plugin.

Why the driver API through cuda-python, not pycuda: cuda-bindings installs as a wheel everywhere (JetPack 6
and 7, desktop), launches on a raw stream handle it did not create, and lets the executor make the device's
primary context — the one TensorRT's runtime uses — current on whichever thread calls (TensorRT calls
`enqueue` on the thread that runs the engine: the agent's scheduler thread, not the one that imported us).
Nothing is allocated per launch: argument blocks are packed from the plan into ctypes values, so a decode
step can be captured in a CUDA graph.

What runs only on a device is `CudaKernels.run`'s driver calls; the argument packing (`pack_arguments`) is
pure and CI checks it against each compiled kernel's own PTX parameter list.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

from trt_plugins.plans import DTYPE_BYTES, Launch, Plan, Ptr

SCALAR_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "fp32": ctypes.c_float}
INT32_RANGE = (-2**31, 2**31 - 1)


class LaunchError(RuntimeError):
    """A plan and a compiled kernel disagree, or the driver refused a call (its error name is quoted)."""


def pack_arguments(launch: Launch, meta: dict, address_of) -> list:
    """The kernel's parameters as ctypes values in the compiled order (meta["args"] / meta["arg_types"] from
    the AOT report), then Triton's trailing scratch pointers (null: the report shows they are unused).
    address_of(Ptr) -> int device address. Arguments compiled in as the constant 1 must be 1 in the plan."""
    if meta["config"] != launch.config.name:
        raise LaunchError(f"{meta['config']}: asked to launch it for {launch.config.name}")
    given = dict(launch.args)
    names, types = meta["args"], meta["arg_types"]
    unknown = [n for n in given if n not in names and given[n] != 1]
    if unknown:
        raise LaunchError(f"{launch.config.name}: {unknown} are compiled in as 1 but the plan passes "
                          f"{[given[n] for n in unknown]}")
    missing = [n for n in names if n not in given]
    if missing:
        raise LaunchError(f"{launch.config.name}: the plan gives no value for {missing}")
    packed = []
    for name, kind in zip(names, types):
        value = given[name]
        if kind.startswith("*"):
            if not isinstance(value, Ptr):
                raise LaunchError(f"{launch.config.name}: {name} is a pointer ({kind}), the plan gives {value!r}")
            packed.append(ctypes.c_uint64(address_of(value)))
        else:
            if isinstance(value, Ptr) or kind not in SCALAR_CTYPES:
                raise LaunchError(f"{launch.config.name}: {name} is {kind}, the plan gives {value!r}")
            if kind == "i32" and not (INT32_RANGE[0] <= value <= INT32_RANGE[1]):
                raise LaunchError(f"{launch.config.name}: {name}={value} does not fit the kernel's int32")
            packed.append(SCALAR_CTYPES[kind](value))
    if meta.get("global_scratch_size", 0) or meta.get("profile_scratch_size", 0):
        raise LaunchError(f"{launch.config.name}: the kernel needs Triton scratch memory, which the plugin does "
                          f"not provide; change its launch configuration")
    packed += [ctypes.c_uint64(0) for _ in range(meta["params"] - len(names))]  # global/profile scratch
    return packed


def address_resolver(plan: Plan, addresses: dict[str, int], workspace: int):
    """Ptr -> device address: the named buffer's base (the workspace's for workspace slices) + offset."""
    buffers = {b.name: b for b in plan.buffers}

    def address_of(ptr: Ptr) -> int:
        b = buffers[ptr.buffer]
        base = workspace + b.offset if b.kind == "workspace" else addresses[b.name]
        return base + ptr.offset * DTYPE_BYTES[b.dtype]
    return address_of


def _checked(driver, result, call: str):
    """The value of a cuda-python driver call, or LaunchError with the driver's error name."""
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise LaunchError(f"{call}: {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else values


class CudaKernels:
    """The compiled kernels of one SM folder (<kernels>/<sm_XY>/<config>.cubin/.ptx/.json), loaded on first use."""

    def __init__(self, folder: Path):
        from cuda.bindings import driver  # the device's dependency only (cuda-bindings)

        self.driver, self.folder = driver, Path(folder)
        self._check(driver.cuInit(0), "cuInit")
        device = self._check(driver.cuDeviceGet(0), "cuDeviceGet")
        self.context = self._check(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
        self._functions: dict[str, tuple] = {}

    @classmethod
    def for_this_gpu(cls, root: Path) -> "CudaKernels":
        """The kernels of root/sm_XY for GPU 0's compute capability."""
        from cuda.bindings import driver

        _checked(driver, driver.cuInit(0), "cuInit")
        device = _checked(driver, driver.cuDeviceGet(0), "cuDeviceGet")
        attr = driver.CUdevice_attribute
        major, minor = (_checked(driver, driver.cuDeviceGetAttribute(a, device), "cuDeviceGetAttribute") for a in (
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR))
        folder = Path(root) / f"sm_{major}{minor}"
        if not folder.is_dir():
            raise LaunchError(f"{folder}: no kernels compiled for this GPU (sm_{major}{minor}); rebuild the bundle "
                              f"for this device (cpm-edge engine --device ...)")
        return cls(folder)

    def _check(self, result, call: str):
        return _checked(self.driver, result, call)

    def make_current(self):
        """The primary context on the calling thread (TensorRT's runtime uses the same one)."""
        current = self._check(self.driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) != int(self.context):
            self._check(self.driver.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def function(self, config: str):
        """(CUfunction, AOT metadata): the cubin, or the PTX for the driver to JIT when the cubin does not load."""
        if config not in self._functions:
            meta_path = self.folder / f"{config}.json"
            if not meta_path.exists():
                raise LaunchError(f"{meta_path}: not compiled; compile the kernels for this model and GPU "
                                  f"(cpm-edge kernels compile --model MODEL_DIR --target sm_XY)")
            meta = json.loads(meta_path.read_text())
            module = None
            for suffix in (".cubin", ".ptx"):
                path = self.folder / f"{config}{suffix}"
                if not path.exists():
                    continue
                image = path.read_bytes() + (b"\0" if suffix == ".ptx" else b"")
                buffer = ctypes.create_string_buffer(image, len(image))
                err, module = self.driver.cuModuleLoadData(ctypes.addressof(buffer))
                if err == self.driver.CUresult.CUDA_SUCCESS:
                    break
                module = None
            if module is None:
                raise LaunchError(f"{self.folder / config}: neither the cubin nor the PTX loads on this GPU")
            fn = self._check(self.driver.cuModuleGetFunction(module, meta["entry"].encode()), "cuModuleGetFunction")
            if meta["shared_bytes"] > 48 * 1024:
                attr = self.driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                self._check(self.driver.cuFuncSetAttribute(fn, attr, meta["shared_bytes"]), "cuFuncSetAttribute")
            self._functions[config] = (module, fn, meta)
        return self._functions[config][1:]

    def run(self, plan: Plan, addresses: dict[str, int], workspace: int, stream: int):
        """Launch every kernel of the plan on `stream` (a raw CUstream handle), in order, asynchronously."""
        self.make_current()
        address_of = address_resolver(plan, addresses, workspace)
        hstream = self.driver.CUstream(stream)
        for launch in plan.launches:
            fn, meta = self.function(launch.config.name)
            args = pack_arguments(launch, meta, address_of)
            pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
            self._check(self.driver.cuLaunchKernel(fn, *launch.grid, meta["threads"], 1, 1, meta["shared_bytes"],
                                                   hstream, ctypes.addressof(pointers), 0), launch.config.name)
