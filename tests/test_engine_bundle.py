"""`cpm-edge engine`: device profiles, bundles with manifest and golden cases, build-on-device, refusals."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
               for m in ("MiniCPM4-0.5B", "MiniCPM4-8B", "MiniCPM5-1B")}
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
    # the AGX Orin profile's int4 weights: the float tiny model is quantized at export, the plugin carries it
    assert manifest["weights"]["format"] == "int4" and manifest["weights"]["source"] == ["rtn"]
    import onnx
    graph = onnx.load(str(bundles["orin"] / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "CpmInt4Gemm" for n in graph.node) == 7 * 2  # q k v o gate up down, 2 layers


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
    bundle = tmp_path / "opt" / "cpm-edge" / "bundle"
    assert verify_files(bundle, read_manifest(bundle)) == len(read_manifest(bundles["orin"])["files"])
    assert (bundle / "model.onnx").exists()  # no engine yet: the device builds it from model.onnx
    assert list((tmp_path / "opt" / "cpm-edge" / "wheels").glob("minicpm_edge-*.whl"))
    venv = tmp_path / "opt" / "cpm-edge" / ".venv"
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", "import cuda.bindings.driver, paho.mqtt, agent.server"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # the GPU launch dependency and the agent, in the device's venv
    unit = (tmp_path / "etc" / "systemd" / "system" / "cpm-edge-agent.service").read_text()
    assert "SupplementaryGroups=video render" in unit and "--state-dir /var/lib/cpm-edge" in unit
    env = tmp_path / "etc" / "cpm-edge" / "agent.env"
    assert "CPM_EDGE_DEVICE_ID=orin-07" in env.read_text() and oct(env.stat().st_mode & 0o777) == "0o600"
    code, _, err = run_cli(capsys, "bundle", "verify", bundle)
    assert code == 0 and "match manifest.json" in err


def test_flash_refuses_a_damaged_bundle(bundles, tmp_path, capsys):
    copy = Path(shutil.copytree(bundles["orin"], tmp_path / "b"))
    (copy / "golden.json").write_text("{}")
    code, _, err = run_cli(capsys, "flash", "--bundle", copy, "--host", f"local:{tmp_path / 'dev'}")
    assert code == 2 and "golden.json: sha256 differs" in err and not (tmp_path / "dev").exists()


def test_a_built_engine_lets_the_device_drop_model_onnx(bundles, tmp_path, capsys):
    from agent.bundle_check import check_at_start, drop_onnx, engine_file
    from cli.device_install import place_bundle

    bundle, manifest = place_bundle(bundles["rtx"], tmp_path, lambda stage: None)
    assert engine_file(bundle, manifest, None) == bundle / "engine.plan"
    assert drop_onnx(bundle, manifest) == ("model.onnx",) and not (bundle / "model.onnx").exists()
    code, _, err = run_cli(capsys, "bundle", "verify", bundle)
    assert code == 0 and "model.onnx removed on purpose" in err, err
    check_at_start(bundle)  # the cheap check accepts the recorded absence
    code, _, err = run_cli(capsys, "engine", "build", "--bundle", bundle)
    assert code == 2 and "model.onnx was removed" in err and "--keep-onnx" in err


def test_an_engine_built_on_the_device_goes_to_the_state_folder(bundles, tmp_path):
    from agent.bundle_check import STATE_ENGINE, engine_file, state_engine, update_manifest

    bundle = Path(shutil.copytree(bundles["rtx"], tmp_path / "bundle"))
    (bundle / "engine.plan").unlink()
    manifest = update_manifest(bundle, engine=None, engine_status="build-on-device")
    before = {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()}
    state = tmp_path / "state"
    proc = subprocess.run([str(Path(sys.executable).with_name("cpm-edge")), "engine", "build", "--bundle", str(bundle),
                           "--state-dir", str(state)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in bundle.iterdir()} == before  # the bundle is as flashed
    assert engine_file(bundle, manifest, state) == state / STATE_ENGINE
    record = json.loads((state / "engine.json").read_text())
    assert record["size"] == (state / STATE_ENGINE).stat().st_size and record["tensorrt_module"] == "tensorrt_rtx"
    assert not list(state.glob(".build-*"))
    (bundle / "manifest.json").write_text((bundle / "manifest.json").read_text() + " ")
    assert state_engine(bundle, state) == (None, f"{state / STATE_ENGINE} was built for another bundle")


def test_ssh_flash_runs_the_device_install_with_the_gpu_extras(bundles):
    from cli.device_install import DeviceSettings, venv_extras
    from cli.flash_commands import FlashOptions, ssh_commands

    opts = FlashOptions(bundles["orin"], "nvidia@orin.local", DeviceSettings(broker="mqtt://broker.lan"))
    commands = ssh_commands(opts, Path("minicpm_edge-0.1.0-py3-none-any.whl"))
    assert [c[0] for c in commands] == ["ssh", "rsync", "rsync", "ssh"]
    assert commands[2][-2].endswith("cpm-edge-agent.service.in")  # the wheel holds no devices/: sent along
    script = commands[-1][-1]
    assert "--host local:/" in script and "--broker mqtt://broker.lan" in script and "pycuda" not in script
    assert venv_extras(read_manifest(bundles["orin"])) == "agent,cuda12"


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
