"""Read and verify an engine bundle on the device (no torch): manifest, sha256 of every file, the GPU and
TensorRT it was built for. Every refusal names what to rebuild."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from agent.errors import AgentInputError

FORMAT_VERSION = 1


class BundleError(AgentInputError):
    """A bundle that is incomplete, tampered with, or made for another device."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: not found; is {folder} an engine bundle (cpm-edge engine)?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot read ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
                          f"make the bundle again with this version of cpm-edge")
    return manifest


def verify_files(folder: str | Path, manifest: dict) -> int:
    """Check the sha256 of every file the manifest lists; returns how many were checked."""
    folder = Path(folder)
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in manifest.json but missing; copy the bundle again")
        if file_sha256(path) != digest:
            raise BundleError(f"{path}: sha256 differs from manifest.json (corrupted or modified); copy the "
                              f"bundle again")
    return len(manifest["files"])


def check_device(manifest: dict, gpu_sm: int | None, trt_version: str | None):
    """Refuse an engine made for another GPU or another TensorRT."""
    if gpu_sm is not None and gpu_sm != manifest["sm"]:
        raise BundleError(f"bundle made for sm_{manifest['sm']} ({manifest['device']}), but this GPU is sm_{gpu_sm}: "
                          f"make a bundle for this device (cpm-edge engine --device PROFILE)")
    built_with = manifest.get("tensorrt_version")
    if manifest.get("engine") and trt_version and built_with and built_with != trt_version:
        raise BundleError(f"engine built with TensorRT {built_with}, but this device has {trt_version}: rebuild it "
                          f"here (cpm-edge engine build --bundle DIR)")


def update_manifest(folder: str | Path, **fields) -> dict:
    """Rewrite manifest.json with new fields and the sha256 of every file now in the folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    manifest.update(fields)
    manifest["files"] = {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*"))
                         if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")}
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / "manifest.json")
    return manifest
