"""`cpm-edge agent` and `cpm-edge ask` as a user runs them: streamed answers, exit codes, one-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mqtt_fixtures import EchoBackend

ROOT = Path(__file__).resolve().parents[1]
CPM = [sys.executable, "-m", "cli.main"]


def run(*args, timeout=60):
    return subprocess.run(CPM + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ask_streams_and_exits_0(broker, run_agent):
    run_agent(broker.url)
    out = run("ask", "--broker", broker.url, "--device", "dev1", "--max-tokens", "40", "Hello robot")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Hello robot\n" and "finish: stop" in out.stderr


def test_ask_errors_exit_non_zero_with_the_message(broker, run_agent):
    run_agent(broker.url, max_tokens=16, default_max_tokens=16)
    out = run("ask", "--broker", broker.url, "--device", "dev1", "--max-tokens", "17", "Hello")
    assert out.returncode == 1 and "too_many_tokens" in out.stderr and "max_tokens" in out.stderr
    out = run("ask", "--broker", broker.url, "--device", "nobody", "--timeout", "1", "Hello")
    assert out.returncode == 1 and "no_answer" in out.stderr
    out = run("ask", "--broker", "http://x", "--device", "dev1", "Hello")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--broker" in out.stderr


@pytest.mark.parametrize("schema, needle", [("{not json", "--json-schema: not JSON"),
                                             ("[1, 2]", "a JSON Schema is an object"),
                                             ("@/nonexistent/schema.json", "--json-schema @/nonexistent/schema.json")])
def test_ask_bad_json_schema_exits_2_before_connecting(schema, needle):
    out = run("ask", "--broker", "mqtt://127.0.0.1:9", "--device", "dev1", "--json-schema", schema, "Which block?")
    assert out.returncode == 2 and needle in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_agent_bad_configuration_exits_2(tmp_path):
    out = run("agent", "--torch-model", str(tmp_path), "--device-id", "a/b")
    assert out.returncode == 2 and "--device-id" in out.stderr
    out = run("agent", "--bundle", str(tmp_path / "none"), "--device-id", "dev1")
    assert out.returncode == 2 and "--bundle" in out.stderr


def test_agent_command_serves_a_model_and_stops_on_sigterm(broker, tiny_dense, make_client):
    env = dict(os.environ, CPM_EDGE_BROKER=broker.url, CPM_EDGE_MQTT_USERNAME="orin",
               CPM_EDGE_MQTT_PASSWORD="never-logged")
    proc = subprocess.Popen(CPM + ["agent", "--torch-model", str(tiny_dense), "--device-id", "dev1",
                                   "--max-seq", "128", "--telemetry", "0"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = make_client(broker.url)
        assert client.wait_online(60), client.last_status
        status = client.last_status
        assert status["state"] == "online" and status["backend"] == "torch"
        answer = client.ask("Hello robot", max_tokens=8, temperature=0, timeout=30)
        assert answer.usage["completion_tokens"] >= 1 and answer.finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "never-logged" not in err
