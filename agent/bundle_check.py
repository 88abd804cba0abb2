"""Read and verify an engine bundle on the device (no torch): manifest, sha256 of every file, the GPU and
TensorRT it was built for. Every refusal names what to rebuild.

The full sha256 pass runs at flash and in `bundle verify`, and leaves a seal (.verified.json: the manifest's
sha256, each file's size and mtime, files removed on purpose); each agent start compares with the seal only
(check_at_start). Engines built on the device can live in the agent's state folder (engine.plan +
engine.json naming the bundle), leaving the bundle as flashed."""
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


def verify_files(folder: str | Path, manifest: dict, dropped: tuple[str, ...] = ()) -> int:
    """Check the sha256 of every file the manifest lists (but those dropped on purpose); returns how many."""
    folder = Path(folder)
    for name, digest in manifest["files"].items():
        if name in dropped:
            continue
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in manifest.json but missing; copy the bundle again")
        if file_sha256(path) != digest:
            raise BundleError(f"{path}: sha256 differs from manifest.json (corrupted or modified); copy the "
                              f"bundle again")
    return len(manifest["files"]) - len(set(dropped) & set(manifest["files"]))


SEAL = ".verified.json"  # written after a full sha256 pass: what the cheap check at each start compares with


def manifest_sha256(folder: str | Path) -> str:
    return file_sha256(Path(folder) / "manifest.json")


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def write_seal(folder: str | Path, manifest: dict, dropped: tuple[str, ...] = ()) -> Path | None:
    """After verify_files passed: record the manifest's sha256 and each file's size and mtime, so a start
    can check the bundle in milliseconds. `dropped` names files removed on purpose (model.onnx once the
    engine is built). Returns the seal's path, or None where the folder is not writable (read-only bundle)."""
    folder = Path(folder)
    seal = {"manifest_sha256": manifest_sha256(folder), "dropped": sorted(dropped),
            "files": {name: _stat(folder / name) for name in manifest["files"] if name not in dropped}}
    tmp = folder / f"{SEAL}.tmp"
    try:
        tmp.write_text(json.dumps(seal, indent=1) + "\n")
        os.replace(tmp, folder / SEAL)
    except OSError:
        return None
    return folder / SEAL


def read_seal(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / SEAL).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def dropped_files(folder: str | Path) -> tuple[str, ...]:
    """Files the seal says were removed on purpose (verify_files accepts their absence)."""
    return tuple((read_seal(folder) or {}).get("dropped", ()))


def quick_check(folder: str | Path, manifest: dict) -> str | None:
    """None when the manifest's own sha256 and every file's size and mtime match the seal; else why not."""
    folder = Path(folder)
    seal = read_seal(folder)
    if seal is None:
        return f"no {SEAL} yet (written by cpm-edge flash or cpm-edge bundle verify)"
    if seal.get("manifest_sha256") != manifest_sha256(folder):
        return "manifest.json changed since the last full check"
    dropped = set(seal.get("dropped", ()))
    for name in manifest["files"]:
        if name in dropped:
            continue
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if seal["files"].get(name) != _stat(path):
            return f"{name} changed size or modification time since the last full check"
    return None


def check_at_start(folder: str | Path) -> dict:
    """The check of every agent start: cheap (sizes, mtimes, the manifest's sha256 against the seal of the last
    full pass) when a seal is there, the full sha256 pass otherwise. Says which it did; returns the manifest."""
    import logging
    import time

    log = logging.getLogger("cpm-edge.agent")
    folder = Path(folder)
    manifest = read_manifest(folder)
    start = time.perf_counter()
    why = quick_check(folder, manifest)
    if why is None:
        log.info("bundle %s: cheap start check passed (%d files: sizes, mtimes and manifest sha256 match the "
                 "full sha256 check recorded in %s) in %.0f ms", folder, len(manifest["files"]), SEAL,
                 1000 * (time.perf_counter() - start))
        return manifest
    log.info("bundle %s: %s; checking the sha256 of every file", folder, why)
    count = verify_files(folder, manifest, dropped_files(folder))
    sealed = write_seal(folder, manifest, dropped_files(folder))
    log.info("bundle %s: %d files match manifest.json (full sha256 check, %.1f s)%s", folder, count,
             time.perf_counter() - start, "" if sealed else
             f"; the folder is read-only, so the next start checks again: run `cpm-edge bundle verify {folder}` "
             f"as its owner to record the check")
    return manifest


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


# --- engines built on the device: in the state folder (systemd's StateDirectory=), never in the bundle -------
STATE_ENGINE = "engine.plan"
STATE_RECORD = "engine.json"


def onnx_files(manifest: dict) -> tuple[str, ...]:
    """model.onnx and its external weights (model.onnx.data), which only an engine build reads."""
    return tuple(name for name in manifest["files"] if name.startswith("model.onnx"))


def record_state_engine(state_dir: str | Path, bundle: str | Path, built: Path, fields: dict) -> dict:
    """Move a freshly built engine file (same file system) to state_dir/engine.plan and write engine.json:
    which bundle it was built from (the manifest's sha256), its sha256, size and mtime (the cheap check at
    each start), the build facts."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    digest = file_sha256(built)
    os.replace(built, state_dir / STATE_ENGINE)
    size, mtime_ns = _stat(state_dir / STATE_ENGINE)
    record = {"bundle_manifest_sha256": manifest_sha256(bundle), "sha256": digest,
              "size": size, "mtime_ns": mtime_ns, **fields}
    tmp = state_dir / f".{STATE_RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, state_dir / STATE_RECORD)
    return record


def state_engine(bundle: str | Path, state_dir: str | Path | None) -> tuple[Path | None, str]:
    """(the engine this device built for this bundle, "") when its record matches the bundle and the file;
    else (None, why not)."""
    if state_dir is None:
        return None, "no state folder given"
    path, record_path = Path(state_dir) / STATE_ENGINE, Path(state_dir) / STATE_RECORD
    try:
        record = json.loads(record_path.read_text())
    except FileNotFoundError:
        return None, f"no engine built on this device yet ({record_path})"
    except (OSError, json.JSONDecodeError) as e:
        return None, f"{record_path}: cannot read ({e})"
    if record.get("bundle_manifest_sha256") != manifest_sha256(bundle):
        return None, f"{path} was built for another bundle"
    if not path.is_file() or _stat(path) != [record.get("size"), record.get("mtime_ns")]:
        return None, f"{path} is missing or changed since it was built"
    return path, ""


def engine_file(bundle: str | Path, manifest: dict, state_dir: str | Path | None) -> Path | None:
    """The engine to deserialize: the bundle's own (built on the host), else the one built on this device."""
    if manifest.get("engine"):
        return Path(bundle) / manifest["engine"]
    return state_engine(bundle, state_dir)[0]


def drop_onnx(bundle: str | Path, manifest: dict) -> tuple[str, ...]:
    """Remove model.onnx (and its external data) from a bundle whose engine exists, and say so in the seal,
    so the full and the cheap checks accept their absence. Returns the names removed."""
    bundle = Path(bundle)
    names = onnx_files(manifest)
    dropped = tuple(sorted(set(dropped_files(bundle)) | set(names)))
    if write_seal(bundle, manifest, dropped) is None:
        raise BundleError(f"{bundle}: not writable; run this as the bundle's owner (root)")
    for name in names:
        (bundle / name).unlink(missing_ok=True)
    return names


def build_into_state(bundle: Path, state_dir: Path, manifest: dict, progress=lambda stage: None) -> dict:
    """build_bundle_engine writes <folder>/engine.plan from <folder>/export.json and model.onnx; the bundle is
    read-only to the agent, so it builds in a scratch folder of the state folder that links to those files,
    and the engine is then moved into place with its record. Returns the build facts."""
    import shutil
    import tempfile

    from trt_plugins.engine_builder import build_bundle_engine

    bundle, state_dir = Path(bundle), Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=state_dir))
    try:
        for name in ("export.json", *onnx_files(manifest)):
            (scratch / name).symlink_to((bundle / name).resolve())
        fields = build_bundle_engine(scratch, manifest["max_batch"], manifest["trt_flavour"], progress,
                                     manifest.get("prefill_chunk"))
        record_state_engine(state_dir, bundle, scratch / fields["engine"], fields)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return fields
