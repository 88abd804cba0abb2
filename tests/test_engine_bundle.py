"""`cpm-edge engine`: device profiles, bundles with manifest and golden cases, build-on-device, refusals."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.bundle_check import BundleError, check_device, read_manifest, verify_files
from cli_helpers import run_cli
from export.profiles import ProfileError, load_profile, profile_paths


@pytest.fixture(scope="module")
def bundles(tiny_models, tmp_path_factory):
    """An RTX bundle with its engine built by TensorRT-RTX, and an Orin bundle to be built on the device."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (tensorrt-rtx-cu13) is not installed")
    from agent.tokenizer import Tokenizer
    from export.bundle import BundleOptions, make_bundle

    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for device in ("rtx", "orin"):
        make_bundle(BundleOptions(device, root / device, str(tiny_models["dense"])),
                    lambda d: Tokenizer(d).encode)
        out[device] = root / device
    return out


def test_every_profile_loads_and_fits_its_default_model_shape():
    from export.checkpoint import config_from_dict
    from export.profiles import plan_for

    data = Path(__file__).parent / "data" / "configs"
    configs = {m: config_from_dict(json.loads((data / f"{m}.config.json").read_text()))
               for m in ("MiniCPM4-0.5B", "MiniCPM4-8B")}
    assert {"orin", "orin-nx-16g", "orin-nano-8g", "thor", "rtx4090", "rtx"} <= set(profile_paths())
    for name in profile_paths():
        profile = load_profile(name)
        plan = plan_for(profile, configs[profile.default_model.split("/")[-1]], profile.default_model)
        assert plan.kv_capacity_tokens >= profile.max_batch * profile.max_context


def test_rtx_bundle_has_engine_manifest_and_golden_cases(bundles, tiny_models):
    import torch
    from export.checkpoint import load_model

    folder = bundles["rtx"]
    manifest = read_manifest(folder)
    assert manifest["engine"] == "engine.plan" and manifest["engine_status"] == "built"
    assert manifest["tensorrt_module"] == "tensorrt_rtx" and manifest["sm"] == 86
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files and verify_files(folder, manifest) == len(files)
    assert any(f.startswith("kernels/sm_86/") and f.endswith(".cubin") for f in files)
    golden = json.loads((folder / "golden.json").read_text())
    logits = np.load(folder / "golden_logits.npy")
    assert len(golden["cases"]) == 3 and logits.shape == (3, 512)
    model = load_model(tiny_models["dense"])
    case = golden["cases"][1]
    ids = list(case["ids"])
    for expected in case["greedy"]:  # independent greedy decode by full forward passes
        model.setup_cache(1, len(ids))
        with torch.inference_mode():
            step = model(torch.tensor([ids]), torch.arange(len(ids))[None])[0, -1]
        assert int(step.argmax()) == expected
        ids.append(expected)


def test_orin_bundle_is_complete_but_the_engine(bundles):
    manifest = read_manifest(bundles["orin"])
    assert manifest["engine"] is None and manifest["engine_status"] == "build-on-device"
    assert "built on the device" in manifest["engine_note"]
    assert (manifest["sm"], manifest["trt_flavour"], manifest["trt_min_version"]) == (87, "tensorrt", "10.3")
    assert {"model.onnx", "export.json", "tokenizer.json", "golden.json", "profile.yaml"} <= set(manifest["files"])
    assert not (bundles["orin"] / "engine.plan").exists()


def test_tampered_file_is_refused(bundles, tmp_path, capsys):
    from agent.backends import open_bundle

    copy = Path(shutil.copytree(bundles["orin"], tmp_path / "b"))
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx: sha256 differs"):
        open_bundle(copy)
    code, _, err = run_cli(capsys, "engine", "build", "--bundle", copy)
    assert code == 2 and "sha256 differs" in err


def test_engine_for_another_gpu_or_tensorrt_is_refused(bundles):
    manifest = read_manifest(bundles["rtx"])
    with pytest.raises(BundleError, match="sm_86 .* this GPU is sm_87"):
        check_device(manifest, 87, manifest["tensorrt_version"])
    with pytest.raises(BundleError, match="rebuild it here"):
        check_device(manifest, 86, "10.3.0")
    check_device(manifest, 86, manifest["tensorrt_version"])


def write_profile(tmp_path, **changes) -> Path:
    raw = yaml.safe_load(Path(load_profile("rtx").path).read_text())
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, needle", [
    ({"max_context": 4_000_000, "max_batch": 64}, "needs"),
    ({"sm": "eighty-seven"}, "key 'sm' must be int"),
    ({"kv_cache_fraction": None}, "key 'kv_cache_fraction' is missing"),
    ({"trt_flavour": "onnx"}, "key 'trt_flavour'"),
    ({"colour": "green"}, "key 'colour' is not a profile key"),
])
def test_bad_profiles_are_refused_before_any_work(changes, needle, tiny_dense, tmp_path, capsys):
    profile = write_profile(tmp_path, **changes)
    code, _, err = run_cli(capsys, "engine", "--device", profile, "--model", tiny_dense, "--out", tmp_path / "out")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_unknown_device_and_missing_model(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, "engine", "--device", "orin-agx-999", "--out", tmp_path / "o")
    assert code == 2 and "no such profile" in err and "orin" in err
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, _, err = run_cli(capsys, "engine", "--device", "orin", "--out", tmp_path / "o")
    assert code == 2 and "openbmb/MiniCPM4-8B" in err and "huggingface-cli download" in err


def test_repo_id_found_in_the_local_hugging_face_cache(tiny_dense, tmp_path, monkeypatch):
    from export.bundle import resolve_model

    repo = tmp_path / "hub" / "models--openbmb--MiniCPM4-0.5B"
    shutil.copytree(tiny_dense, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model("openbmb/MiniCPM4-0.5B") == repo / "snapshots" / "abc123"


def test_flash_to_a_folder_installs_and_verifies(bundles, tmp_path, capsys):
    code, _, err = run_cli(capsys, "flash", "--bundle", bundles["orin"], "--host", f"local:{tmp_path}",
                        "--broker", "mqtt://broker.lan:1883", "--device-id", "orin-07")
    assert code == 0, err
    assert "verifying 58 files" in err or "verifying" in err
    bundle = tmp_path / "opt" / "cpm-edge" / "bundle"
    assert verify_files(bundle, read_manifest(bundle)) == len(read_manifest(bundles["orin"])["files"])
    assert list((tmp_path / "opt" / "cpm-edge" / "wheels").glob("minicpm_edge-*.whl"))
    unit = (tmp_path / "etc" / "systemd" / "system" / "cpm-edge-agent.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec" in unit
    env = tmp_path / "etc" / "cpm-edge" / "agent.env"
    assert "CPM_EDGE_DEVICE_ID=orin-07" in env.read_text() and oct(env.stat().st_mode & 0o777) == "0o600"
    code, _, err = run_cli(capsys, "bundle", "verify", bundle)
    assert code == 0 and "match manifest.json" in err


def test_flash_refuses_a_damaged_bundle(bundles, tmp_path, capsys):
    copy = Path(shutil.copytree(bundles["orin"], tmp_path / "b"))
    (copy / "golden.json").write_text("{}")
    code, _, err = run_cli(capsys, "flash", "--bundle", copy, "--host", f"local:{tmp_path / 'dev'}")
    assert code == 2 and "golden.json: sha256 differs" in err and not (tmp_path / "dev").exists()


def test_ssh_flash_builds_the_engine_on_the_device_when_missing(bundles):
    from cli.flash_commands import FlashOptions, ssh_commands

    commands = ssh_commands(FlashOptions(bundles["orin"], "nvidia@orin.local"), read_manifest(bundles["orin"]),
                            "minicpm_edge-0.1.0-py3-none-any.whl")
    script = commands[-1][-1]
    assert [c[0] for c in commands] == ["ssh", "rsync", "rsync", "ssh"]
    order = [script.index(s) for s in ("bundle verify", "engine build --bundle", "systemctl enable --now")]
    assert order == sorted(order)
    with_engine = ssh_commands(FlashOptions(bundles["rtx"], "h"), read_manifest(bundles["rtx"]), "w.whl")
    assert "engine build" not in with_engine[-1][-1]


def test_device_check_passes_the_model_that_made_it_and_catches_another(bundles, tiny_models):
    from agent.device_check import against_floors, check_golden
    from export.checkpoint import load_model
    from export.torch_backend import TorchBackend

    right = check_golden(TorchBackend(load_model(tiny_models["dense"]), 1, 256), bundles["rtx"])
    assert all(r["pass"] and r["logits_cosine"] > 0.99999 for r in right)
    # The ternary tiny model is the dense one fake-quantized: close, but not the answers the bundle promises.
    wrong = check_golden(TorchBackend(load_model(tiny_models["ternary"]), 1, 256), bundles["rtx"])
    assert not any(r["pass"] for r in wrong)
    floors = against_floors({"decode_tokens_per_s": 30.0, "time_to_first_token_ms": 120.0},
                            {"decode_tokens_per_s": 40, "time_to_first_token_ms": 200})
    assert (floors["decode_tokens_per_s"]["pass"], floors["time_to_first_token_ms"]["pass"]) == (False, True)
