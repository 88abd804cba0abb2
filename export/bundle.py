"""Engine bundles: everything one device needs, checked by sha256.

    cpm-edge engine --device orin [--model M] --out build/engines/orin

export (trt flavor, the profile's dtype and context) -> compile kernels for the profile's SM -> build the
engine when this machine can build for that device (TensorRT-RTX anywhere with its wheel; a Jetson engine only
on a Jetson) -> bundle:

    manifest.json       format, device, SM, TensorRT flavour/version, JetPack, model hash, plugin version,
                        engine status, and the sha256 of every other file
    engine.plan         (absent in a build-on-device bundle: `cpm-edge engine build --bundle DIR` makes it)
    model.onnx, export.json, tokenizer files
    kernels/sm_XY/      cubins + launch metadata, report.json
    profile.yaml        the device profile it was made for
    golden.json, golden_logits.npy   prompts -> greedy tokens and first-step logits from the torch model
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.checkpoint import (AtomicDir, CheckpointError, file_sha256, load_config, load_model,
                               with_folder_revision)
from export.profiles import DeviceProfile, expectations, load_profile, plan_for, speed_model

FORMAT_VERSION = 1
GOLDEN_PROMPTS = ("The robot arm picks up", "Hello! How are you today?", "Sparse attention reads only")
GOLDEN_TOKENS = 16


def hf_cache_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return [home / "hub"]


def resolve_model(model: str) -> Path:
    """A model folder, or a Hugging Face repo id found in the local Hugging Face cache (no download)."""
    path = Path(model)
    if path.is_dir():
        return path
    if model.count("/") == 1 and not path.exists():
        for cache in hf_cache_dirs():
            repo = cache / f"models--{model.replace('/', '--')}"
            ref = repo / "refs" / "main"
            if ref.exists():
                snapshot = repo / "snapshots" / ref.read_text().strip()
                if (snapshot / "config.json").exists():
                    return snapshot
        raise CheckpointError(
            f"model {model!r} is not a folder and not in the Hugging Face cache ({hf_cache_dirs()[0]}): download "
            f"it on a connected machine (huggingface-cli download {model}) or pass MODEL=path/to/folder")
    raise CheckpointError(f"model {model!r}: folder not found")


def can_build_here(profile: DeviceProfile) -> tuple[bool, str]:
    """Whether this machine can build the profile's engine, and why not."""
    import importlib.util

    if profile.trt_flavour == "onnxruntime":
        return False, "none needed: ONNX Runtime runs model.onnx as it is"
    if profile.trt_flavour == "tensorrt-rtx":
        if importlib.util.find_spec("tensorrt_rtx") is None:
            return False, "TensorRT-RTX is not installed here (pip install tensorrt-rtx-cu13)"
        return True, ""
    from trt_plugins.engine_builder import local_gpu_sm

    local_sm = local_gpu_sm()
    if local_sm != profile.sm:
        where = f"this machine's GPU is sm_{local_sm}" if local_sm else "this machine has no NVIDIA GPU"
        return False, f"a {profile.description} engine is built on the device ({where})"
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT is not installed here (it comes with JetPack)"
    return True, ""


def compile_kernels(target: str, model_dir: Path, out: Path, cache: Path):
    """`cpm-edge kernels compile` in a process of its own (Triton's interpreter, which tests turn on, must
    not be active while compiling); fails on spills not accepted in writing."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(cache))
    proc = subprocess.run([sys.executable, "-m", "cli.main", "kernels", "compile", "--target", target,
                           "--model", str(model_dir), "--out", str(out)], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise CheckpointError(f"compiling the kernels for {target} failed: {proc.stderr.strip().splitlines()[-1]}")


@dataclass
class BundleOptions:
    device: str
    out: Path
    model: str | None = None
    overwrite: bool = False
    context: int | None = None  # positions per row; None: the profile's max_context


def golden_cases(model_dir: Path, config, out: Path, sparse: bool, encode, int4_group: int | None = None):
    """Greedy tokens and first-step logits of fixed prompts from the torch model, for test-device.
    encode(text) -> token ids is the tokenizer the device will use (the caller's). int4_group: the export
    quantized the projections to int4 (round-to-nearest, groups of this size): so does the model here."""
    import torch

    from export.transforms import use_sparse_attention

    from export.profiles import weight_bytes

    # fp32 when it fits comfortably in this host's memory (an 8B model needs 32 GB), else bf16.
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    dtype = torch.float32 if 2 * weight_bytes(config, "fp16") < total / 2 else torch.bfloat16
    model = load_model(model_dir, dtype, config=config)
    if int4_group:
        from export.quantized import quantize_model
        quantize_model(model, int4_group)
    if sparse:
        use_sparse_attention(model)
    cases, first_logits = [], []
    for prompt in GOLDEN_PROMPTS:
        ids = encode(prompt)
        model.setup_cache(1, len(ids) + GOLDEN_TOKENS)
        tokens, step_ids, pos = [], ids, 0
        with torch.inference_mode():
            for i in range(GOLDEN_TOKENS):
                logits = model(torch.tensor([step_ids]), torch.arange(pos, pos + len(step_ids))[None])[0, -1]
                if i == 0:
                    first_logits.append(logits.float().numpy())
                pos += len(step_ids)
                step_ids = [int(logits.argmax())]
                tokens.append(step_ids[0])
        cases.append({"prompt": prompt, "ids": ids, "greedy": tokens})
    (out / "golden.json").write_text(json.dumps({"tokens": GOLDEN_TOKENS, "dtype": str(dtype).removeprefix("torch."),
                                                 "cases": cases}, indent=1))
    np.save(out / "golden_logits.npy", np.stack(first_logits).astype(np.float32))


def write_manifest(folder: Path, fields: dict):
    files = {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": files}
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / "manifest.json")
    return manifest


def bundle_plan(opts: BundleOptions):
    """(profile, model name, model folder, config overrides, config, memory plan) for these options; refuses
    (ProfileError / CheckpointError, exit 2) a model or context that does not fit, with the plan."""
    from export.checkpoint import read_json
    from export.long_context import config_with, overrides_for
    from export.quantized import kernel_group, read_quant_config

    profile = load_profile(opts.device)
    model_name = opts.model or profile.default_model
    model_dir = resolve_model(model_name)
    raw = read_json(model_dir / "config.json")
    context = opts.context or profile.max_context
    spec = read_quant_config(model_dir)
    if spec is not None:  # a GPTQ/AWQ checkpoint brings its own 4-bit weights, whatever the profile's default
        profile = dataclasses.replace(profile, weights="int4", weight_group_size=kernel_group(spec.group_size) or 128)
    overrides = overrides_for(raw, context, profile.sparse)
    config = (with_folder_revision(config_with(raw, overrides, str(model_dir / "config.json")), model_dir,
                                   {**raw, **overrides}) if overrides else load_config(model_dir))
    return profile, model_name, model_dir, overrides, config, plan_for(profile, config, model_name, opts.context)


def plan_report(profile: DeviceProfile, config, plan, overrides: dict) -> list[str]:
    """What `cpm-edge engine` prints before it builds: overrides, memory plan, expected speed."""
    lines = []
    if overrides:
        lines.append(f"config overrides (published MiniCPM4 128K settings, config.json untouched): "
                     f"{', '.join(sorted(overrides))}")
    lines += ["memory plan:", *plan.lines()]
    model = speed_model(profile, config, plan)
    if model:
        c, f = model["ceilings"], model["floors"]
        lines.append(f"expected decode (batch 1, position {model['position']}): ceiling "
                     f"{c['decode_tokens_per_s']:.1f} tok/s ({model['bytes_read_per_decode_token'] / 1e9:.2f} GB read "
                     f"per token at {profile.memory_bandwidth_gbs:g} GB/s), device-test floor "
                     f"{f['decode_tokens_per_s']:.1f} tok/s; at position {plan.max_context}: ceiling "
                     f"{model['decode_ceiling_at_full_context']:.1f} tok/s")
        if "prefill_tokens_per_s" in c:
            lines.append(f"expected prefill: ceiling {c['prefill_tokens_per_s']:.0f} tok/s "
                         f"({profile.tensor_tflops:g} TFLOPS), floor {f['prefill_tokens_per_s']:.0f} tok/s")
    return lines


@contextlib.contextmanager
def model_view(model_dir: Path, overrides: dict):
    """model_dir itself, or (with overrides) a temporary folder whose config.json carries them."""
    if not overrides:
        yield model_dir
        return
    from export.long_context import overlay_folder

    with tempfile.TemporaryDirectory(prefix="cpm-edge-model-") as tmp:
        yield overlay_folder(model_dir, overrides, Path(tmp))


def make_bundle(opts: BundleOptions, encoder_for, progress=lambda stage: None) -> dict:
    """Export, compile, build (when possible) and write the bundle; returns its manifest.
    encoder_for(model_dir) gives the text -> token ids function of the device's tokenizer."""
    from export.onnx_export import ExportOptions, export
    from trt_plugins.engine_builder import build_bundle_engine
    from trt_plugins.names import PLUGIN_VERSION

    profile, model_name, model_dir, overrides, config, plan = bundle_plan(opts)  # refused before any work
    for line in plan_report(profile, config, plan, overrides):
        progress(line)
    encode = encoder_for(model_dir)
    destination = AtomicDir(opts.out, overwrite=opts.overwrite)
    destination.check()
    buildable, why_not = can_build_here(profile)
    portable = profile.trt_flavour == "onnxruntime"  # devices/cpu: no kernels, no engine
    flavor = "portable" if portable else "trt"
    with destination as tmp, model_view(model_dir, overrides) as source:
        progress(f"[1/5] export: {flavor} flavor, {profile.dtype}, {profile.weights} weights, context "
                 f"{plan.max_context}, sparse {'on' if plan.sparse else 'off'}")
        export(ExportOptions(source, tmp / "export", flavor, profile.dtype, plan.max_context, sparse=plan.sparse,
                             weights=profile.weights, group_size=profile.weight_group_size), progress)
        for item in (tmp / "export").iterdir():
            item.rename(tmp / item.name)
        (tmp / "export").rmdir()
        if overrides:  # the export read a temporary view of the folder: name the checkpoint and what was changed
            info = json.loads((tmp / "export.json").read_text())
            info.update(source=str(Path(model_dir).resolve()), config_overrides=sorted(overrides))
            (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        engine_info = {}
        if portable:
            progress("[2/5] kernels: none (ONNX Runtime's CPU kernels); [3/5] engine: none (model.onnx is run)")
            engine_info = {"engine_status": "onnxruntime"}
        else:
            progress(f"[2/5] kernels for {profile.target}")
            compile_kernels(profile.target, source, tmp / "kernels", Path(opts.out).parent / ".triton-cache")
        if buildable:
            progress(f"[3/5] engine for {profile.description}")
            engine_info = build_bundle_engine(tmp, profile.max_batch, profile.trt_flavour, max_prefill=profile.prefill_chunk)
        elif not portable:
            progress(f"[3/5] engine: not built here ({why_not}); the device builds it on first start "
                     f"(cpm-edge engine build --bundle DIR)")
        progress("[4/5] golden cases from the torch model")
        weights = json.loads((tmp / "export.json").read_text())["weights"]
        quantized_here = weights["format"] == "int4" and weights["source"] == ["rtn"]
        golden_cases(source, config, tmp, plan.sparse, encode, profile.weight_group_size if quantized_here else None)
        (tmp / "plan.json").write_text(json.dumps(expectations(profile, config, plan, model_name), indent=1) + "\n")
        shutil.copy2(profile.path, tmp / "profile.yaml")
        progress("[5/5] manifest (sha256 of every file)")
        model_hash = json.loads((tmp / "export.json").read_text())["model_hash"]  # hashed once, by the export
        manifest = write_manifest(tmp, {
            "device": profile.name, "sm": profile.sm, "trt_flavour": profile.trt_flavour,
            "trt_min_version": profile.trt_min_version, "jetpack": profile.jetpack or None,
            "model": model_name, "model_hash": model_hash, "plugin_version": PLUGIN_VERSION,
            "max_batch": plan.max_batch, "max_context": plan.max_context, "dtype": profile.dtype,
            "weights": weights,
            "prefill_chunk": profile.prefill_chunk,
            "sparse": plan.sparse, "kv_cache_bytes": plan.kv_bytes, "config_overrides": sorted(overrides),
            "backend": "onnxruntime" if portable else "tensorrt",
            "engine": None, "engine_status": "build-on-device", "engine_note": why_not or None, **engine_info,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return manifest
