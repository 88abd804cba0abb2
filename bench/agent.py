"""`make bench-agent`: the MQTT agent's own overhead and its request rate on a loopback Mosquitto.

Overhead = (first token received by the client - request published) - engine time of that first token
(the agent reports it as timings.engine_ttft_ms). It is what the agent adds: MQTT both ways, JSON, queueing,
tokenization, scheduling. Measured with a numpy backend that costs ~nothing (so the number is all agent) and
with the tiny torch model. Then a long prompt arriving while a stream runs, on the tiny model exported to
ONNX Runtime, prefilled whole and in chunks: the running stream's longest gap and the newcomers' time to first
token. Writes bench/results/agent.json and agent.png, and agent_long_prompt.json (`--long-prompt` runs only
that part). Structured output: decode-step time with N of 8 rows under a JSON schema, the key
"constrained_decode" of agent.json and agent_constrained.png (`--constrained` runs only that part).
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


# --- structured output: what grammar masks cost per decode step --------------------------------------
# 30 strings of 2-6 characters: a constrained answer runs ~100+ tokens, so rows rarely turn over.
BENCH_SCHEMA = {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 6},
                "minItems": 30, "maxItems": 30}
MIXES = (0, 1, 2, 4, 8)  # constrained rows of the 8


class MixRun:
    """backend.max_batch rows decoding, `constrained` of them under BENCH_SCHEMA (a finished row is replaced by
    one of its kind, all sampled at temperature 1). overlap: masks computed in the worker while the backend
    decodes; else inline, row by row, as each row samples."""

    def __init__(self, backend, tokenizer, constrained: int, overlap: bool):
        from agent.constraints import Grammars, parse_constraint
        from agent.generation import BatchGenerator

        self.backend, self.constrained = backend, constrained
        self.grammars = Grammars(tokenizer)
        self.spec = parse_constraint({"response_format": {"type": "json_schema",
                                                          "json_schema": {"schema": BENCH_SCHEMA}}}, 1 << 16)
        self.gen = BatchGenerator(backend, tokenizer, masks=self.grammars if overlap else None)
        self.ids = tokenizer.encode("The robot reports its state as JSON:")
        self.made = 0
        self.times: list[float] = []
        for i in range(backend.max_batch):
            self._add(i < constrained)

    def _add(self, is_constrained: bool):
        from agent.generation import SamplingParams

        self.made += 1
        self.gen.add(self.made, self.ids, SamplingParams(max_tokens=200, temperature=1.0, seed=self.made),
                     on_done=lambda key, out: self._add(is_constrained),
                     constraint=self.grammars.compile(self.spec) if is_constrained else None)

    def run(self, steps: int):
        """Time `steps` steps; keep those that decoded exactly this mix with no prefill in them."""
        gen = self.gen
        for _ in range(steps):
            rows = [r for r in gen.rows if r is not None]
            steady = not gen.waiting and len(rows) == self.backend.max_batch and \
                all(r.prefilled == len(r.ids) for r in rows)
            t0 = time.perf_counter()
            gen.step()
            if steady and sum(r.constraint is not None for r in rows) == self.constrained:
                self.times.append((time.perf_counter() - t0) * 1000)


def mask_cost(tokenizer, rows: int, parallel: bool, steps: int = 40) -> dict:
    """Without a model: ms per step to compute the masks of `rows` BENCH_SCHEMA matchers (advanced by the
    argmax of random logits), in one parallel llguidance call or row by row; ms to apply one row's mask; ms to
    compile the schema into a matcher (once per request)."""
    from agent.constraints import Grammars, parse_constraint

    grammars = Grammars(tokenizer)
    spec = parse_constraint({"response_format": {"type": "json_schema", "json_schema": {"schema": BENCH_SCHEMA}}},
                            1 << 16)
    rng = np.random.default_rng(0)
    grammars.ready()
    compile_ms = []
    for _ in range(10):
        t0 = time.perf_counter()
        grammars.compile(spec)
        compile_ms.append((time.perf_counter() - t0) * 1000)
    live = [grammars.compile(spec) for _ in range(rows)]
    fill, apply = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        grammars.fill_masks(live, parallel)
        fill.append((time.perf_counter() - t0) * 1000)
        for i, c in enumerate(live):
            logits = rng.standard_normal(tokenizer.vocab_size).astype(np.float32)
            t0 = time.perf_counter()
            masked = c.apply(logits)
            apply.append((time.perf_counter() - t0) * 1000)
            if c.advance(int(np.argmax(masked))):
                live[i] = grammars.compile(spec)
    return {"masks_ms": round(float(np.median(fill)), 3), "apply_one_row_ms": round(float(np.median(apply)), 3),
            "compile_ms": round(float(np.median(compile_ms)), 3)}


class CorpusTokenizer:
    """A Tokenizer (agent/tokenizer.py's interface) with a MiniCPM4-sized vocabulary, no model hub needed: the
    most frequent words and punctuation runs of the Python standard library's source, each also with a leading
    '▁' (space), as sentencepiece-style BPE pieces with byte fallback. Only the mask cost is measured on it, and
    that depends on the vocabulary, not on merges (BPE training at this size takes minutes on 2 cores)."""

    def __init__(self, vocab_size: int = 73448, corpus_chars: int = 20_000_000):
        import re
        import sysconfig
        from collections import Counter

        from tokenizers import Tokenizer as HFTokenizer, decoders, models

        counts, n = Counter(), 0
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            words = re.findall(r"\w+|[^\w\s]+", text)
            counts.update(words)
            counts.update("▁" + w for w in words)
            n += len(text)
            if n >= corpus_chars:
                break
        vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])}
        for word, _ in counts.most_common():
            if len(vocab) >= vocab_size:
                break
            vocab.setdefault(word, len(vocab))
        tok = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        self._tok, self.eos_ids, self.bos_id = tok, [2], 1
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids))


class WaitingBackend:
    """A stand-in for a GPU-bound decode: each step waits `decode_s` (sleeping, the GIL released, as a
    backend waiting for its GPU does) and returns random logits of the tokenizer's width. Only to show what
    computing the masks during the decode hides; its tokens mean nothing."""

    def __init__(self, vocab: int, decode_s: float = 0.010, max_batch: int = 8, max_seq: int = 512):
        self.max_batch, self.max_seq, self.decode_s = max_batch, max_seq, decode_s
        self.pool = np.random.default_rng(0).standard_normal((64, vocab)).astype(np.float32)
        self.turn = 0

    def prefill(self, row, ids, start=0):
        return self.pool[row]

    def decode(self, tokens, positions):
        time.sleep(self.decode_s)
        self.turn = (self.turn + 1) % 8
        return self.pool[self.turn * 8:self.turn * 8 + len(tokens)]


def constrained_main(update: bool = True, rounds: int = 60) -> dict:
    """Decode-step time with N of 8 rows under a JSON schema vs all free, masks overlapped with the decode and
    inline; and the mask cost alone on the tiny and on a MiniCPM4-sized vocabulary. Sets the
    "constrained_decode" key of bench/results/agent.json (the other keys stay) and draws agent_constrained.png."""
    from agent.onnxruntime_backend import OnnxRuntimeBackend
    from export.onnx_export import ExportOptions, export
    from export.tiny import write_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = write_tiny(tmp / "tiny", "dense", seed=0)
        exported = export(ExportOptions(model, tmp / "ort", max_seq=512))
        tokenizer = Tokenizer(exported)
        # one backend per mix, run in turns of 5 steps: a busy machine slows every mix alike
        runs = {(mode, n): MixRun(OnnxRuntimeBackend(exported, max_batch=8, threads=1), tokenizer, n,
                                  mode == "overlapped") for mode in ("overlapped", "inline") for n in MIXES}
        for _ in range(rounds):
            for run in runs.values():
                run.run(5)
        raw = {mode: {n: runs[mode, n].times for n in MIXES} for mode in ("overlapped", "inline")}
    # quantiles of each mix's steps: this machine is shared, slow phases hit a step or two in a row; the quiet
    # quarter (p25) compares mixes best
    step = {f"{mode}_{q}": {str(n): round(float(np.percentile(ms, int(q[1:]))), 3) for n, ms in runs.items()}
            for mode, runs in raw.items() for q in ("p25", "p50")}
    big = CorpusTokenizer()
    waiting = {(mode, n): MixRun(WaitingBackend(big.vocab_size), big, n, mode == "overlapped")
               for mode in ("overlapped", "inline") for n in (0, 8)}
    for _ in range(rounds // 3):
        for run in waiting.values():
            run.run(5)
    waiting_ms = {f"{mode}_p50": {str(n): round(float(np.median(waiting[mode, n].times)), 3) for n in (0, 8)}
                  for mode in ("overlapped", "inline")}
    from agent.constraints import Grammars
    t0 = time.perf_counter()
    Grammars(big).ready()  # what an agent pays once (in a thread at start)
    build_s = time.perf_counter() - t0
    result = {
        "what": "ms per BatchGenerator.step (p25 and p50 of each mix) with 8 rows decoding on the tiny model in "
                "ONNX Runtime, 1 thread (vocab 512), N of them constrained by a JSON schema (30 strings of 2-6 "
                "chars), the others free, all sampled; masks by llguidance computed in a worker during the decode "
                "(overlapped; row by row on <= 2 cores, else one parallel call) or inline as each row samples. "
                "mask_cost: the masks alone (no model) for 1/4/8 rows, in one parallel call or row by row, at "
                "vocab 512 and at a MiniCPM4-sized 73448-token vocabulary (CorpusTokenizer)",
        "schema": BENCH_SCHEMA, "steps_measured": {m: {str(n): len(v) for n, v in r.items()} for m, r in raw.items()},
        "step_ms": step,
        "added_ms_per_constrained_row_p25": {m: round((step[f"{m}_p25"]["8"] - step[f"{m}_p25"]["0"]) / 8, 3)
                                             for m in raw},
        "mask_cost": {f"vocab_{tok.vocab_size}": {f"rows_{n}_{way}": mask_cost(tok, n, way == "parallel")
                                                  for n in (1, 4, 8) for way in ("parallel", "row_by_row")}
                      for tok in (tokenizer, big)},
        "vocab_index_build_s": {f"vocab_{big.vocab_size}": round(build_s, 2)},
        "gpu_like_decode": {"what": "ms per step, 8 rows, vocab 73448 (CorpusTokenizer), a stand-in backend whose "
                                    "decode waits 10 ms with the CPU free (WaitingBackend), 0 or 8 rows "
                                    "constrained, masks overlapped with that wait or inline (p50)",
                            "step_ms": waiting_ms},
        "machine": machine(),
    }
    import llguidance
    result["llguidance"] = llguidance.__version__
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "agent.json"
    if update:
        current = json.loads(path.read_text()) if path.exists() else {"machine": machine()}
        current["constrained_decode"] = result
        path.write_text(json.dumps(current, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return result
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, by_n in step.items():
        ax.plot(MIXES, [by_n[str(n)] for n in MIXES], marker="o", ls="-" if name.endswith("p25") else ":",
                label=f"masks {name.replace('_', ', ')}")
    ax.set_xlabel("rows of 8 under a JSON schema (the rest free)")
    ax.set_ylabel("ms per decode step")
    ax.set_title("structured output: decode step time, tiny model on ONNX Runtime")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "agent_constrained.png", dpi=120)
    return result


def main():
    if "--long-prompt" in sys.argv[1:]:
        return long_prompt_main()
    if "--constrained" in sys.argv[1:]:
        constrained_main()
        return 0
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
    constrained_main()
    return long_prompt_main()


if __name__ == "__main__":
    raise SystemExit(main())
