"""`cpm-edge engine`: a device bundle from a model and a device profile; `cpm-edge engine build` on the device."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from agent.errors import AgentInputError


def engine_arguments(p: argparse.ArgumentParser):
    p.add_argument("action", nargs="?", choices=("build",),
                   help="build: on the device, build (and cache) the engine of a build-on-device bundle")
    p.add_argument("--device", help="device profile: a name under devices/ (orin, rtx4090, ...) or a YAML file")
    p.add_argument("--model", help="MiniCPM4 folder or Hugging Face repo id in the local HF cache "
                                   "(default: the profile's default_model)")
    p.add_argument("--out", help="bundle folder to create (default build/engines/DEVICE)")
    p.add_argument("--bundle", help="with build: the bundle folder on the device")
    p.add_argument("--state-dir", help="with build: put the engine in this writable folder (the agent's "
                                       "/var/lib/cpm-edge) and leave the bundle as flashed")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--context", type=_context, help="positions per row (default: the profile's max_context); beyond "
                                                    "the model's own (32K for MiniCPM4-8B) the published InfLLM v2 "
                                                    "and LongRoPE settings are applied, up to 131072")


def _context(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of positions") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"{value}: at least 16 positions")
    return value


def progress(stage: str):
    print(f"engine: {stage}", file=sys.stderr, flush=True)


def engine(args) -> int:
    if args.action == "build":
        if not args.bundle:
            raise AgentInputError("engine build: --bundle DIR is required")
        return build_on_device(Path(args.bundle), Path(args.state_dir) if args.state_dir else None)
    if not args.device:
        raise AgentInputError("engine: --device is required (a profile under devices/, e.g. --device orin)")
    from agent.tokenizer import Tokenizer
    from export.bundle import BundleOptions, make_bundle

    out = Path(args.out or f"build/engines/{Path(args.device).stem}")
    start = time.perf_counter()
    manifest = make_bundle(BundleOptions(args.device, out, args.model, args.force, args.context),
                           lambda model_dir: Tokenizer(model_dir).encode, progress)
    status = ("engine built" if manifest["engine"] else "no engine: ONNX Runtime runs model.onnx"
              if manifest.get("backend") == "onnxruntime" else
              f"no engine yet: {manifest['engine_note']}; on the device run cpm-edge engine build --bundle DIR")
    print(f"bundle for {manifest['device']} ({len(manifest['files'])} files) in {out} after "
          f"{time.perf_counter() - start:.0f} s: {status}", file=sys.stderr)
    return 0


def build_on_device(bundle: Path, state_dir: Path | None = None) -> int:
    """Verify the bundle, check it was made for this GPU, build the engine with this TensorRT; keep it in the
    state folder (the bundle stays as flashed) or, without one, in the bundle."""
    from agent.bundle_check import (check_device, dropped_files, onnx_files, read_manifest, update_manifest,
                                    verify_files)
    from trt_plugins.engine_builder import build_bundle_engine
    from trt_plugins.tensorrt_plugins import TensorRTMissing, import_tensorrt

    manifest = read_manifest(bundle)
    dropped = dropped_files(bundle)
    if set(onnx_files(manifest)) & set(dropped):
        raise AgentInputError(f"{bundle}: model.onnx was removed when this device built its engine; to build "
                              f"again, flash the bundle again (add --keep-onnx to keep model.onnx)")
    progress(f"verified {verify_files(bundle, manifest, dropped)} files (sha256)")
    try:
        trt = import_tensorrt("tensorrt" if manifest["trt_flavour"] == "tensorrt" else "rtx")
    except TensorRTMissing as e:
        raise AgentInputError(str(e)) from None
    from trt_plugins.engine_builder import local_gpu_sm

    check_device({**manifest, "engine": None}, local_gpu_sm(), None)  # the right GPU; any TensorRT may build
    progress(f"building with {trt.__name__} {trt.__version__} for sm_{manifest['sm']}")
    if state_dir is not None:
        from agent.bundle_check import build_into_state

        fields = build_into_state(bundle, state_dir, manifest, progress)
        print(f"engine built in {fields['engine_build_seconds']} s and kept in {state_dir}", file=sys.stderr)
        return 0
    fields = build_bundle_engine(bundle, manifest["max_batch"], manifest["trt_flavour"], progress,
                                 manifest.get("prefill_chunk"))
    manifest = update_manifest(bundle, **fields)
    from agent.bundle_check import write_seal

    write_seal(bundle, manifest, dropped)  # every file was just hashed: the next start's check stays cheap
    print(f"engine built in {fields['engine_build_seconds']} s and cached in {bundle}/{fields['engine']}",
          file=sys.stderr)
    return 0


COMMANDS = [("engine", engine_arguments, engine, "make a device bundle (export, kernels, engine, golden cases)")]
