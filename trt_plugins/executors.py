"""Carry out a launch plan (trt_plugins/plans.py) with the Triton kernels themselves, over torch tensors.

On a GPU the kernels are JIT-compiled; on CPU they run in Triton's interpreter (TRITON_INTERPRET=1 set before
Triton is imported). The arguments, grids and workspace layout are exactly the plan's — the same plan the
TensorRT plugin hands to trt_plugins/cuda_launch.py on a device — so executing a plugin's plan here checks
that plan for real: `cpm-edge generate --plugins interpreter` and the tests do.
"""
from __future__ import annotations

import importlib
import inspect
import os

import torch

from trt_plugins.plans import Launch, Plan, Ptr

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "i32": torch.int32,
                "i64": torch.int64, "u8": torch.uint8, "i8": torch.int8}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
MODULES = {"attention": "trt_plugins.attention.kernels", "selection": "trt_plugins.attention.selection",
           "ternary": "trt_plugins.ternary.kernels", "int4": "trt_plugins.int4.kernels"}
# Triton's interpreter (3.9) computes tl.dot on bf16 operands wrongly (it reads the raw bits): under the
# interpreter the kernels upcast their dot operands to fp32. On a GPU the operands keep their dtype.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_function(launch: Launch):
    return getattr(importlib.import_module(MODULES[launch.config.module]), launch.config.kernel)


def run_launch(launch: Launch, tensors: dict[str, torch.Tensor]):
    """One launch: a pointer is the named tensor's first element moved by the plan's offset (its strides
    are the plan's scalar arguments; the tensor's own view does not matter)."""
    fn = kernel_function(launch)
    values = {}
    for name, value in launch.args:
        if isinstance(value, Ptr):
            t = tensors[value.buffer]
            value = t if value.offset == 0 else t.as_strided((1,), (1,), t.storage_offset() + value.offset)
        values[name] = value
    constexprs = dict(launch.config.constexprs)
    if "UPCAST" in constexprs:
        constexprs["UPCAST"] = INTERPRETING
    defaults = {n for n, p in inspect.signature(fn.fn).parameters.items() if p.default is not p.empty}
    missing = [a for a in fn.arg_names if a not in values and a not in constexprs and a not in defaults]
    if missing:
        raise RuntimeError(f"{launch.config.name}: the plan gives no value for {missing}")
    fn[launch.grid](**values, **constexprs, num_warps=launch.config.num_warps)


def bind(plan: Plan, tensors: dict[str, torch.Tensor], device=None) -> dict[str, torch.Tensor]:
    """The plan's buffers as tensors: the caller's (checked for dtype and size), the workspace allocated as
    one block and sliced at the plan's byte offsets (as TensorRT hands the plugin one workspace pointer)."""
    bound = {}
    workspace = None
    for b in plan.buffers:
        if b.kind == "workspace":
            if workspace is None:
                some = next(iter(tensors.values()))
                workspace = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=device or some.device)
            bound[b.name] = workspace[b.offset:b.offset + b.nbytes].view(TORCH_DTYPES[b.dtype])
            continue
        t = tensors[b.name]
        if t.dtype != TORCH_DTYPES[b.dtype] or t.numel() != b.numel or not t.is_contiguous():
            raise ValueError(f"plan buffer {b.name}: expected {b.numel} contiguous {b.dtype}, got "
                             f"{tuple(t.shape)} {t.dtype}{'' if t.is_contiguous() else ' (not contiguous)'}")
        bound[b.name] = t
    return bound


def run_triton(plan: Plan, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Execute every launch of the plan in order; state and output buffers are written in place."""
    bound = bind(plan, tensors)
    for launch in plan.launches:
        run_launch(launch, bound)
    return bound
