"""`cpm-edge device-test`: for real on a CPU ONNX Runtime bundle (the tiny model), through the agent's own
server, over a private Mosquitto and in-process; on a flashed NVIDIA device `make test-device` runs it for the
device's bundle (pytest -m gpu, skipped elsewhere with the reason printed by -ra).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cli_helpers import run_cli
from mqtt_fixtures import needs_mosquitto

BUNDLE = Path(os.environ.get("CPM_EDGE_BUNDLE", "/opt/cpm-edge/bundle"))


def untied_tiny(folder: Path, seed: int) -> Path:
    """A tiny dense model with its own lm_head: with tied embeddings a random tiny model repeats the last
    prompt token whatever its weights, and golden answers could not tell two models apart."""
    from export.tiny import write_tiny

    return write_tiny(folder, "dense", seed=seed, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    return untied_tiny(tmp_path_factory.mktemp("tiny-untied") / "model", seed=11)


@pytest.fixture(scope="module")
def cpu_bundle(tiny_untied, tmp_path_factory):
    """`cpm-edge engine --device <the cpu profile at 1024 positions>` of a tiny dense model."""
    from agent.tokenizer import Tokenizer
    from export.bundle import BundleOptions, make_bundle
    from export.profiles import load_profile

    root = tmp_path_factory.mktemp("cpu-bundle")
    raw = yaml.safe_load(Path(load_profile("cpu").path).read_text())
    profile = root / "cpu-1k.yaml"
    profile.write_text(yaml.safe_dump({**raw, "max_context": 1024}))
    make_bundle(BundleOptions(str(profile), root / "bundle", str(tiny_untied)), lambda d: Tokenizer(d).encode)
    return root / "bundle"


def device_test(capsys, bundle, tmp_path, transport):
    code, _, err = run_cli(capsys, "device-test", "--bundle", bundle, "--report", tmp_path / "r.json",
                           "--transport", transport)
    return code, err, json.loads((tmp_path / "r.json").read_text())


def check_report(report, bundle):
    plan = json.loads((bundle / "plan.json").read_text())
    assert report["pass"], report
    assert len(report["golden"]) == 3 and all(g["tokens_match"] and g["logits_pass"] for g in report["golden"])
    speed = report["speed"]
    # the speed prompt: as close to plan.json's 512 tokens as whole words allow, never more
    assert plan["speed_test"]["prompt_tokens"] - 16 <= speed["prompt_tokens"] <= plan["speed_test"]["prompt_tokens"]
    assert len(speed["runs"]) == 3 and all(r["completion_tokens"] >= 32 for r in speed["runs"])
    for r in speed["runs"]:  # the client waits at least as long as the server's own admission-to-first-token
        assert r["time_to_first_token_ms"] >= r["engine_ttft_ms"] * 0.99
        assert r["prefill_tokens_per_s"] == pytest.approx(r["prompt_tokens"] / (r["engine_ttft_ms"] / 1000), rel=1e-2)
    assert set(report["floors"]) == {"decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_ms",
                                     "gpu_memory_gb"}
    for key, f in report["floors"].items():
        assert f["floor"] == plan["floors"][key]
    assert report["floors"]["gpu_memory_gb"]["measured"] is None  # no GPU here: reported, not invented
    assert report["gpu_memory"]["measured"] is False and "nvml" in report["gpu_memory"]["note"]
    assert report["host_memory"]["peak_rss_gb"] > 0.01
    assert all(s["pass"] for s in report["floors_below_ceilings"].values())
    # every request went through the server and got exactly one final answer: warm-up, 3 golden, >= 3 speed
    server = report["server"]
    assert server["accepted"] == server["completed"] >= 7 and server["outstanding"] == 0 and not server["errors"]


@needs_mosquitto
def test_device_test_over_a_private_mosquitto(cpu_bundle, tmp_path, capsys):
    code, err, report = device_test(capsys, cpu_bundle, tmp_path, "mosquitto")
    assert code == 0, err
    assert report["transport"].startswith("mqtt (private mosquitto at mqtt://127.0.0.1:")
    check_report(report, cpu_bundle)
    assert "device test passed" in err and "GPU memory: not measured" in err


def test_device_test_in_process(cpu_bundle, tmp_path, capsys):
    code, err, report = device_test(capsys, cpu_bundle, tmp_path, "in-process")
    assert code == 0, err
    assert report["transport"].startswith("in-process")
    check_report(report, cpu_bundle)


def test_a_floor_the_device_misses_fails_the_test(tiny_untied, tmp_path, capsys):
    """A hand-set first-token limit of 1 ms (no ceiling bounds a time): answers right, exit 1 all the same."""
    from agent.tokenizer import Tokenizer
    from export.bundle import BundleOptions, make_bundle
    from export.profiles import load_profile

    raw = yaml.safe_load(Path(load_profile("cpu").path).read_text())
    profile = tmp_path / "strict.yaml"
    profile.write_text(yaml.safe_dump({**raw, "max_context": 256, "floors": {"time_to_first_token_ms": 1}}))
    make_bundle(BundleOptions(str(profile), tmp_path / "bundle", str(tiny_untied)), lambda d: Tokenizer(d).encode)
    code, err, report = device_test(capsys, tmp_path / "bundle", tmp_path, "in-process")
    assert code == 1 and "device test FAILED" in err
    assert all(g["pass"] for g in report["golden"])
    ttft = report["floors"]["time_to_first_token_ms"]
    assert ttft["floor"] == 1 and ttft["measured"] > 1 and not ttft["pass"]
    assert report["floors"]["decode_tokens_per_s"]["pass"]  # the model's own floors still hold


def test_the_served_answers_catch_another_model(cpu_bundle, tmp_path):
    """A tiny model of the same shape and tokenizer with other weights: the served answers are not the golden."""
    from agent.backends import open_bundle
    from agent.config import AgentConfig
    from agent.device_check import golden_through_server
    from agent.loopback import InProcessClient, InProcessTransport
    from agent.server import AgentServer
    from export.onnx_export import ExportOptions, export

    other = export(ExportOptions(untied_tiny(tmp_path / "other", seed=12), tmp_path / "export", max_seq=256))
    backend, tokenizer, info = open_bundle(other, max_batch=1)
    server = AgentServer(backend, tokenizer, AgentConfig(device_id="t", telemetry_s=0), info)
    link = InProcessTransport(server.handle)
    server.start(link)
    try:
        results = golden_through_server(InProcessClient(link, server.topics), tokenizer, cpu_bundle, 60)
    finally:
        server.stop()
    assert not any(r["tokens_match"] for r in results)
    assert all("text" in r["mismatches"] for r in results)
    assert all(r["mismatches"].get("prompt_tokens") is None for r in results)  # same tokenizer, same prompt ids


def test_expected_answer_is_what_the_generation_loop_makes_of_the_golden_tokens(tiny_tokenizer, seed):
    """Replay golden tokens through the agent's own BatchGenerator (a backend that emits them) and compare."""
    from agent.device_check import expected_answer
    from agent.generation import SamplingParams, generate

    rng = np.random.default_rng(seed)
    eos = tiny_tokenizer.eos_ids[0]
    body = [int(t) for t in rng.integers(3, 500, 12)]  # byte-fallback ids included: partial UTF-8 on purpose

    class Replay:
        max_batch, max_seq = 1, 64

        def __init__(self, tokens):
            self.tokens = list(tokens)

        def _next(self):
            logits = np.zeros(512, np.float32)
            logits[self.tokens.pop(0)] = 1.0
            return logits

        def prefill(self, row, ids, start=0):
            return self._next()

        def decode(self, tokens, positions):
            return self._next()[None]

    for golden in (body + [eos] + body[:3], body):
        out = generate(Replay(golden), tiny_tokenizer, [[1, 5, 6]], [SamplingParams(max_tokens=len(golden))])[0]
        assert expected_answer(tiny_tokenizer, golden) == (out.text, len(out.token_ids), out.finish_reason)
    assert expected_answer(tiny_tokenizer, body + [eos])[1:] == (12, "stop")


def test_floors_are_the_bandwidth_model_by_independent_arithmetic(cpu_bundle, tiny_untied):
    """plan.json's ceilings and floors, recomputed from the checkpoint's own tensors and the profile's numbers."""
    from safetensors import safe_open

    plan = json.loads((cpu_bundle / "plan.json").read_text())
    profile = yaml.safe_load((cpu_bundle / "profile.yaml").read_text())
    config = json.loads((tiny_untied / "config.json").read_text())
    with safe_open(str(tiny_untied / "model.safetensors"), framework="np") as f:
        shapes = {k: int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()}
    params = sum(shapes.values())
    matmul = sum(n for k, n in shapes.items() if k.endswith("_proj.weight") or k == "lm_head.weight")
    # fp32 profile; a decode step gathers one row of the (untied) embedding table and reads the rest whole
    read = (params - (config["vocab_size"] - 1) * config["hidden_size"]) * 4
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_position = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4
    position = 512 + 64 // 2
    ceiling = profile["memory_bandwidth_gbs"] * 1e9 / (read + position * per_position)
    floor = 1 / (1 / (ceiling * profile["efficiency"]["decode"]) + profile["step_overhead_ms"] / 1000)
    model = plan["speed_model"]
    assert model["ceilings"]["decode_tokens_per_s"] == pytest.approx(ceiling, rel=1e-9)
    assert plan["floors"]["decode_tokens_per_s"] == pytest.approx(floor, rel=1e-9) and floor < ceiling
    prefill = profile["tensor_tflops"] * 1e12 / (2 * matmul)  # a multiply-add per matrix weight and token
    assert model["ceilings"]["prefill_tokens_per_s"] == pytest.approx(prefill, rel=1e-9)
    assert plan["floors"]["prefill_tokens_per_s"] == pytest.approx(prefill * profile["efficiency"]["prefill"])
    assert plan["memory"]["weight_bytes"] == params * 4
    assert plan["memory"]["kv_bytes"] == profile["max_batch"] * 1024 * per_position


def test_a_floor_above_the_hardware_ceiling_is_refused(tiny_dense, tmp_path, capsys):
    from export.profiles import load_profile

    raw = yaml.safe_load(Path(load_profile("cpu").path).read_text())
    profile = tmp_path / "greedy.yaml"
    profile.write_text(yaml.safe_dump({**raw, "max_context": 256, "floors": {"decode_tokens_per_s": 1e6}}))
    code, _, err = run_cli(capsys, "engine", "--device", profile, "--model", tiny_dense, "--out", tmp_path / "out")
    assert code == 2 and "floors.decode_tokens_per_s" in err and "above what the hardware allows" in err, err
    assert not (tmp_path / "out").exists()


def test_no_gpu_memory_source_says_why(tmp_path):
    from agent.gpu_memory import GpuMemory

    report = GpuMemory(order=("nvml", "cuda")).start().stop()
    assert report["measured"] is False and report["source"] is None
    assert "nvml:" in report["note"] and "cuda:" in report["note"]


def test_tegrastats_memory_is_the_peak_over_the_baseline(tmp_path):
    """On a Jetson the GPU's memory is the system's: the agent's share is the peak of tegrastats' RAM figure
    over the one before the model loaded. A stand-in prints JetPack 6 tegrastats lines (none on this machine)."""
    from agent.gpu_memory import GpuMemory

    script = tmp_path / "tegrastats"
    line = "RAM {}/62780MB (lfb 1217x4MB) SWAP 0/31390MB (cached 0MB) CPU [2%@729,1%@729] GR3D_FREQ 0%@[305,305]"
    script.write_text("#!/bin/sh\n[ \"$1\" = --interval ] || exit 3\n"
                      + "".join(f"echo '{line.format(mb)}'; sleep 0.3\n" for mb in (1000, 1000, 4100, 2500))
                      + f"while true; do echo '{line.format(2500)}'; sleep 0.3; done\n")
    script.chmod(0o755)
    memory = GpuMemory(interval_s=0.05, tegrastats=str(script)).start()
    assert memory.name == "tegrastats" and memory.baseline == 1000 * 2**20
    import time

    time.sleep(1.6)
    report = memory.stop()
    assert (report["source"], report["scope"]) == ("tegrastats", "system")
    assert report["peak_gb"] == 4100 * 2**20 / 1e9 and report["total_gb"] == 62780 * 2**20 / 1e9
    assert report["used_by_agent_gb"] == 3100 * 2**20 / 1e9


def test_private_mosquitto_starts_listens_and_stops(tmp_path):
    from agent.loopback import LocalMosquitto, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto not installed (make setup installs it)")
    import socket

    broker = LocalMosquitto()
    url = broker.start()
    pid, port = broker.proc.pid, broker.port
    assert url == f"mqtt://127.0.0.1:{port}"
    socket.create_connection(("127.0.0.1", port), 1).close()
    conf = (broker.folder / "mosquitto.conf").read_text()
    assert "set_tcp_nodelay true" in conf and f"listener {port} 127.0.0.1" in conf
    broker.stop()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()


# --- on a flashed NVIDIA device ------------------------------------------------------------------------
def no_device_reason() -> str:
    if shutil.which("nvidia-smi") is None and not Path("/proc/device-tree/model").exists():
        return "no NVIDIA GPU here (nvidia-smi not found, not a Jetson)"
    if not (BUNDLE / "manifest.json").exists():
        return f"no flashed bundle at {BUNDLE} (set CPM_EDGE_BUNDLE)"
    return ""


@pytest.mark.gpu
@pytest.mark.skipif(bool(no_device_reason()), reason=no_device_reason() or "device present")
def test_flashed_device_gives_golden_answers_at_profile_speed(tmp_path):
    exe = Path(sys.executable).with_name("cpm-edge")
    proc = subprocess.run([str(exe), "device-test", "--bundle", str(BUNDLE), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gpu_memory"]["measured"], report["gpu_memory"]  # measured where it lives, on a GPU
