"""`make demo`'s serving half: a loopback broker, `cpm-edge agent` on a model, `cpm-edge ask` streaming an answer.

The broker is Mosquitto when its binary is installed (unless CPM_EDGE_DEMO_BROKER=embedded), else the embedded MQTT 3.1.1 broker (agent/broker.py)
with agent and client on MQTT 3.1.1. Everything listens on 127.0.0.1 only and is stopped at the end.

    python -m agent.demo --bundle DIR | --torch-model DIR  [--prompt TEXT] [--schema-demo] [ask options ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# What a robot's code can act on: which block, how sure (0-100), whether to grip now.
DEMO_SCHEMA = {"type": "object", "properties": {"block": {"enum": ["red", "green", "blue"]},
                                                "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
                                                "grip": {"type": "boolean"}},
               "required": ["block", "confidence", "grip"], "additionalProperties": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_broker(folder: Path):
    """(url, mqtt_version, stop) for a loopback broker."""
    port = _free_port()
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
    if binary and os.environ.get("CPM_EDGE_DEMO_BROKER") != "embedded":
        conf = folder / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"demo: Mosquitto on 127.0.0.1:{port}", file=sys.stderr)

        def stop():
            proc.terminate()
            proc.wait(10)
        return f"mqtt://127.0.0.1:{port}", "5", stop
    from agent.broker import EmbeddedBroker

    broker = EmbeddedBroker("127.0.0.1", port)
    broker.start()
    print(f"demo: no mosquitto installed; embedded MQTT 3.1.1 broker on 127.0.0.1:{port}", file=sys.stderr)
    return f"mqtt://127.0.0.1:{port}", "3.1.1", broker.stop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.demo", description=__doc__.splitlines()[0])
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--bundle")
    model.add_argument("--torch-model")
    p.add_argument("--prompt", default="Which block should the robot pick up?")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the agent to come online")
    p.add_argument("--schema-demo", action="store_true",
                   help="then ask once more for JSON valid against DEMO_SCHEMA (structured output)")
    args, ask_args = p.parse_known_args(argv)
    cpm = [sys.executable, "-m", "cli.main"]
    with tempfile.TemporaryDirectory(prefix="cpm-demo-") as tmp:
        url, version, stop_broker = _start_broker(Path(tmp))
        model = ["--bundle", args.bundle] if args.bundle else ["--torch-model", args.torch_model]
        agent = subprocess.Popen(cpm + ["agent", *model, "--broker", url, "--device-id", "demo",
                                        "--mqtt-version", version, "--telemetry", "0"])
        try:
            from agent.client import AgentClient

            with AgentClient(url, "demo", mqtt_version=version) as watcher:
                deadline = time.monotonic() + args.timeout
                while not watcher.wait_online(1.0):
                    if agent.poll() is not None or time.monotonic() > deadline:
                        print("demo: the agent did not come online", file=sys.stderr)
                        return 1
            ask = cpm + ["ask", "--broker", url, "--device", "demo", "--mqtt-version", version]
            code = subprocess.call(ask + [*ask_args, args.prompt])
            if code == 0 and args.schema_demo:
                print(f"demo: the same agent, constrained to the JSON Schema {json.dumps(DEMO_SCHEMA)}",
                      file=sys.stderr)
                code = subprocess.call(ask + ["--json-schema", json.dumps(DEMO_SCHEMA), "--max-tokens", "96",
                                              "--temperature", "0", args.prompt])
            return code
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(20)
                except subprocess.TimeoutExpired:
                    agent.kill()
            stop_broker()


if __name__ == "__main__":
    raise SystemExit(main())
