"""`make bench-agent`: the MQTT agent's own overhead and its request rate on a loopback Mosquitto.

Overhead = (first token received by the client - request published) - engine time of that first token
(the agent reports it as timings.engine_ttft_ms). It is what the agent adds: MQTT both ways, JSON, queueing,
tokenization, scheduling. Measured with a numpy backend that costs ~nothing (so the number is all agent) and
with the tiny torch model. Then a long prompt arriving while a stream runs, on the tiny model exported to
ONNX Runtime, prefilled whole and in chunks: the running stream's longest gap and the newcomers' time to first
token. Writes bench/results/agent.json and agent.png, and agent_long_prompt.json (`--long-prompt` runs only
that part).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.client import AgentClient  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.service import Agent  # noqa: E402
from agent.tokenizer import Tokenizer  # noqa: E402


class NullBackend:
    """One fixed next token per row: engine time ~0, so latency is the agent's."""

    def __init__(self, max_batch=16, max_seq=512, vocab=512, token=300):
        self.max_batch, self.max_seq = max_batch, max_seq
        self.logits = np.full(vocab, -10.0, np.float32)
        self.logits[token] = 10.0

    def prefill(self, row, ids):
        return self.logits

    def decode(self, tokens, positions):
        return np.broadcast_to(self.logits, (len(tokens), self.logits.size))


def start_mosquitto(folder: Path):
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    user = "user root\n" if os.geteuid() == 0 else ""
    (folder / "m.conf").write_text(f"{user}listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                                   f"max_queued_messages 0\nmax_inflight_messages 0\n")
    proc = subprocess.Popen([binary, "-c", str(folder / "m.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"mqtt://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("mosquitto did not start")


def overhead(url, n=2000, max_tokens=1):
    """Sequential requests from one v5 client: overhead per request in ms."""
    out = []
    with AgentClient(url, "bench") as client:
        for i in range(n + 50):
            t0 = time.perf_counter()
            pending = client.submit("The robot arm picks up the red block.", max_tokens=max_tokens, temperature=0)
            first = None
            for _ in pending.stream(timeout=30):
                if first is None:
                    first = time.perf_counter()
            first = first or time.perf_counter()
            if i >= 50:  # warm-up
                out.append((first - t0) * 1000 - pending.answer.timings["engine_ttft_ms"])
    return np.array(out)


def throughput(url, clients=32, seconds=5.0, max_tokens=16):
    done, tokens = [0], [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    conns = [AgentClient(url, "bench").connect() for _ in range(clients)]

    def work(c):
        while time.monotonic() < stop:
            a = c.ask("Hello robot, which block?", max_tokens=max_tokens, temperature=0, timeout=30)
            with lock:
                done[0] += 1
                tokens[0] += a.usage["completion_tokens"]

    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    for c in conns:
        c.close()
    return done[0] / elapsed, tokens[0] / elapsed


def long_prompt_stall(url, tokenizer, backend, prompt_tokens=3000, runs=3):
    """A stream runs; a ~prompt_tokens prompt and a short one arrive together. Returns the running stream's
    longest gap between chunks while the long prompt is prefilled, and both newcomers' ttft (agent side)."""
    from agent.generation import SamplingParams, generate

    rng = np.random.default_rng(0)
    words = ["robot", "arm", "red", "block", "tray", "turns", "over", "camera", "sees", "the", "gripper"]
    steady = next(t for t in (" ".join(rng.choice(words, 6)) for _ in range(200))
                  if generate(backend, tokenizer, [tokenizer.encode(t)], [SamplingParams(max_tokens=200)])[0]
                  .finish_reason == "length")
    long_text = " ".join(rng.choice(words, prompt_tokens))
    while len(tokenizer.encode(long_text)) > prompt_tokens:
        long_text = long_text.rsplit(" ", 50)[0]
    out = {"gap_ms": [], "long_ttft_ms": [], "short_ttft_ms": [], "prompt_tokens": len(tokenizer.encode(long_text))}
    with AgentClient(url, "bench") as client:
        for _ in range(runs):
            run = client.submit(steady, max_tokens=200, temperature=0)
            times = []
            follow = threading.Thread(target=lambda: [times.append(time.perf_counter()) for _ in run.stream(60)])
            follow.start()
            while len(times) < 5:
                time.sleep(0.001)
            t0 = time.perf_counter()
            long = client.submit(long_text, max_tokens=1, temperature=0)
            short = client.submit("Hello robot", max_tokens=1, temperature=0)
            long_ttft = long.result(60).timings["ttft_ms"]
            out["short_ttft_ms"].append(short.result(60).timings["ttft_ms"])
            out["long_ttft_ms"].append(long_ttft)
            follow.join(60)
            seen = [t0] + [t for t in times if t > t0]
            end = t0 + long_ttft / 1000  # gaps that began before the long prompt's first token
            out["gap_ms"].append(max((b - a) * 1000 for a, b in zip(seen, seen[1:]) if a <= end))
    return {k: round(float(np.median(v)), 2) if isinstance(v, list) else v for k, v in out.items()}


def stats(ms):
    return {"n": int(ms.size), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3)}


def machine():
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    version = subprocess.run([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"], capture_output=True,
                             text=True).stdout.splitlines()[0]
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "broker": version}


def long_prompt_main(prompt_tokens: int = 3000):
    """A long prompt while a stream runs, prefilled whole and in 512-token chunks (agent_long_prompt.json)."""
    from agent.onnxruntime_backend import OnnxRuntimeBackend
    from export.onnx_export import ExportOptions, export
    from export.tiny import write_tiny

    results = {"machine": machine(), "backend": "onnxruntime, tiny dense model, 3 rows, MQTT v5 QoS 1",
               "what": "a stream runs; a long prompt and 'Hello robot' arrive together (median of 3): the "
                       "stream's longest gap between chunks, each newcomer's ttft (agent side)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny(tmp / "tiny", "dense", seed=0)
        tokenizer = Tokenizer(model)
        exported = export(ExportOptions(model, tmp / "ort", max_seq=4096))
        broker, url = start_mosquitto(tmp)
        try:
            for name, chunk in (("whole", 1 << 20), ("chunk_512", 512)):
                agent = Agent(AgentConfig(broker=url, device_id="bench", telemetry_s=0, prefill_chunk=chunk,
                                          chunk_tokens=1, chunk_ms=0))
                agent.serve(OnnxRuntimeBackend(exported, max_batch=3), tokenizer, {"model": "tiny-ort"})
                agent.transport.subscribed.wait(10)
                results[name] = long_prompt_stall(url, tokenizer, OnnxRuntimeBackend(exported), prompt_tokens)
                agent.stop()
        finally:
            broker.terminate()
            broker.wait(10)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent_long_prompt.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def main():
    if "--long-prompt" in sys.argv[1:]:
        return long_prompt_main()
    from export.tiny import write_tiny  # the bench may use torch; the agent never does

    results = {"machine": machine(), "goal": {"overhead_p50_ms": 2.0, "overhead_p99_ms": 10.0}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny(tmp / "tiny", "dense", seed=0)
        tokenizer = Tokenizer(model)
        broker, url = start_mosquitto(tmp)
        try:
            agent = Agent(AgentConfig(broker=url, device_id="bench", telemetry_s=0, queue_size=256))
            agent.serve(NullBackend(), tokenizer, {"model": "null"})
            agent.transport.subscribed.wait(10)
            raw = {"null_backend": overhead(url)}
            rps, tps = throughput(url)
            results["null_backend"] = {"overhead": stats(raw["null_backend"]), "requests_per_s_32_clients":
                                       round(rps, 1), "tokens_per_s_32_clients": round(tps, 1)}
            agent.stop()

            from export.checkpoint import load_model
            from export.torch_backend import TorchBackend
            import torch
            torch.set_num_threads(1)
            agent = Agent(AgentConfig(broker=url, device_id="bench", telemetry_s=0, queue_size=256))
            agent.serve(TorchBackend(load_model(model), max_batch=8, max_seq=256), tokenizer, {"model": "tiny"})
            agent.transport.subscribed.wait(10)
            raw["tiny_torch"] = overhead(url, n=500)
            rps, tps = throughput(url, clients=16, max_tokens=16)
            results["tiny_torch"] = {"overhead": stats(raw["tiny_torch"]), "requests_per_s_16_clients":
                                     round(rps, 1), "tokens_per_s_16_clients": round(tps, 1)}
            agent.stop()
        finally:
            broker.terminate()
            broker.wait(10)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ms in raw.items():
        xs = np.sort(ms)
        ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=f"{name} (p50 {np.median(ms):.2f} ms)")
    ax.axvline(2.0, ls="--", c="gray", lw=0.8)
    ax.axvline(10.0, ls=":", c="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("agent overhead: publish -> first token, minus engine time (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"cpm-edge agent on loopback Mosquitto ({results['machine']['cores']} cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "agent.png", dpi=120)
    return long_prompt_main()


if __name__ == "__main__":
    raise SystemExit(main())
