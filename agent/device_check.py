"""On-device regression through the path that serves real requests: right answers, at the right speed, in
the memory the plan said.

`run_device_test` opens the bundle's backend and starts the agent's own server in this process (scheduler
thread, BatchGenerator with its prefill chunks, the backend), then sends requests through the protocol layer:
over MQTT through a private loopback Mosquitto when the machine has one (the agent's MqttTransport and the
AgentClient that `cpm-edge ask` uses), else through an in-process transport that hands the server the same
messages. It checks
  - golden answers: each golden prompt (ids -> greedy tokens from the torch model on the host) sent as text
    at temperature 0; the agent's prompt token count must equal the golden ids, its text and token count the
    golden tokens' (up to the first end-of-sequence). The first-step logits are compared on the backend
    directly before the server starts (the protocol carries text, not logits).
  - speed: a prompt of about plan.json's speed_test.prompt_tokens, then its decode_tokens: time to first
    token as the client sees it, prefill rate (prompt tokens / the server's admission-to-first-token time),
    decode rate (the server's tokens/s) - the median of three runs after a warm-up.
  - memory: GPU memory sampled all along from where it lives (agent/gpu_memory.py); peak RSS apart, as host
    memory.
Floors come from the bundle's plan.json (export/profiles.py's bandwidth model, made on the host).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np

from agent.errors import AgentInputError

# The engine computes in fp16/bf16, the golden logits come from fp32: compare shapes of the distribution,
# not bits. Greedy tokens must match exactly (a flipped argmax is a regression worth a look).
LOGITS_MIN_COSINE = 0.999
LOGITS_MAX_REL_ERROR = 0.05  # max |device - golden| / max |golden|
SPEED_RUNS = 3
LOWER_IS_BETTER = ("time_to_first_token_ms", "gpu_memory_gb")
DEFAULT_SPEED_TEST = {"prompt_tokens": 512, "decode_tokens": 64}


def compare_logits(logits: np.ndarray, ref: np.ndarray) -> dict:
    logits, ref = logits.astype(np.float64), ref.astype(np.float64)
    cosine = float(logits @ ref / (np.linalg.norm(logits) * np.linalg.norm(ref)))
    rel = float(np.abs(logits - ref).max() / np.abs(ref).max())
    return {"logits_cosine": cosine, "logits_max_rel_error": rel,
            "logits_pass": cosine >= LOGITS_MIN_COSINE and rel <= LOGITS_MAX_REL_ERROR}


def check_golden(backend, folder: Path) -> list[dict]:
    """The golden cases straight on a backend (prefill + greedy decode, one row): the bundle tests' check of
    a backend; device-test sends the same cases through the server instead (golden_through_server)."""
    golden = json.loads((folder / "golden.json").read_text())
    expected_logits = np.load(folder / "golden_logits.npy")
    results = []
    for case, ref in zip(golden["cases"], expected_logits):
        logits = backend.prefill(0, np.asarray(case["ids"], dtype=np.int64))
        tokens, pos = [int(np.argmax(logits))], len(case["ids"])
        while len(tokens) < len(case["greedy"]):
            step = backend.decode(np.array([tokens[-1]]), np.array([pos]))[0]
            tokens.append(int(np.argmax(step)))
            pos += 1
        cmp = compare_logits(logits, ref)
        results.append({"prompt": case["prompt"], "tokens_match": tokens == case["greedy"],
                        "first_mismatch": next((i for i, (a, b) in enumerate(zip(tokens, case["greedy"])) if a != b),
                                               None), **cmp, "pass": tokens == case["greedy"] and cmp["logits_pass"]})
    return results


def check_first_logits(backend, folder: Path) -> list[dict]:
    """First-step logits of each golden prompt against the host's, on the backend itself."""
    golden = json.loads((folder / "golden.json").read_text())
    expected = np.load(folder / "golden_logits.npy")
    return [compare_logits(backend.prefill(0, np.asarray(case["ids"], dtype=np.int64)), ref)
            for case, ref in zip(golden["cases"], expected)]


def expected_answer(tokenizer, greedy: list[int]) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) the agent must answer for golden greedy tokens: generation
    stops at the first end-of-sequence id, which is not part of the answer, and the text is what the agent's
    own TextStream makes of those tokens (it holds back a character whose UTF-8 bytes are incomplete)."""
    from agent.tokenizer import TextStream

    eos = set(tokenizer.eos_ids)
    cut = next((i for i, t in enumerate(greedy) if t in eos), None)
    kept = greedy if cut is None else greedy[:cut]
    stream = TextStream(tokenizer)
    for token in kept:
        stream.push(token)
    return stream.text, len(kept), "length" if cut is None else "stop"


def golden_through_server(client, tokenizer, folder: Path, timeout: float) -> list[dict]:
    golden = json.loads((folder / "golden.json").read_text())
    results = []
    for case in golden["cases"]:
        text, count, reason = expected_answer(tokenizer, case["greedy"])
        answer = client.ask(case["prompt"], max_tokens=len(case["greedy"]), temperature=0, timeout=timeout)
        checks = {"prompt_tokens": (answer.usage.get("prompt_tokens"), len(case["ids"])),
                  "completion_tokens": (answer.usage.get("completion_tokens"), count),
                  "text": (answer.text, text), "finish_reason": (answer.finish_reason, reason)}
        wrong = {k: {"got": got, "expected": want} for k, (got, want) in checks.items() if got != want}
        results.append({"prompt": case["prompt"], "tokens_match": not wrong, "mismatches": wrong})
    return results


def speed_prompt(tokenizer, target_tokens: int, seed_text: str) -> str:
    """Text of about target_tokens tokens (never more): seed_text repeated, cut at a word."""
    words, text = [], ""
    source = (seed_text.split() or ["robot"]) * (target_tokens + 1)
    for word in source:
        candidate = f"{text} {word}" if text else word
        if len(tokenizer.encode(candidate)) > target_tokens:
            break
        words.append(word)
        text = candidate
    return text


def timed_ask(client, prompt: str, decode_tokens: int, timeout: float, **params) -> dict:
    """One request; the client-side time to the first streamed text, and the server's own timings."""
    sent = time.perf_counter()
    first: list[float] = []
    answer = client.ask(prompt, max_tokens=decode_tokens, timeout=timeout,
                        on_text=lambda t: first or first.append(time.perf_counter()), **params)
    end = time.perf_counter()
    t = answer.timings
    engine_ttft_s = t.get("engine_ttft_ms", 0) / 1000
    return {"prompt_tokens": answer.usage.get("prompt_tokens", 0),
            "completion_tokens": answer.usage.get("completion_tokens", 0),
            "time_to_first_token_ms": 1000 * ((first[0] if first else end) - sent),
            "server_ttft_ms": t.get("ttft_ms"), "engine_ttft_ms": t.get("engine_ttft_ms"),
            "prefill_tokens_per_s": answer.usage.get("prompt_tokens", 0) / engine_ttft_s if engine_ttft_s else 0.0,
            "decode_tokens_per_s": t.get("tokens_per_s", 0.0), "finish_reason": answer.finish_reason}


def measure_speed(client, tokenizer, speed_test: dict, max_seq: int, seed_text: str, timeout: float) -> dict:
    """Warm-up, then SPEED_RUNS runs of the speed prompt; the median of each figure. A run that ended early
    (the model chose end-of-sequence) is sent again sampled, so decode is timed over enough tokens."""
    decode = min(speed_test["decode_tokens"], max_seq // 4)
    prompt = speed_prompt(tokenizer, min(speed_test["prompt_tokens"], max_seq - decode - 2), seed_text)
    timed_ask(client, seed_text, 4, timeout, temperature=0)  # warm-up: first launches, graphs, allocations
    runs = []
    for i in range(SPEED_RUNS):
        run = timed_ask(client, prompt, decode, timeout, temperature=0)
        for seed in range(3):
            if run["completion_tokens"] >= decode // 2:
                break
            run = timed_ask(client, prompt, decode, timeout, temperature=1.0, seed=1000 * i + seed)
        runs.append(run)
    keys = ("time_to_first_token_ms", "prefill_tokens_per_s", "decode_tokens_per_s")
    return {"prompt_tokens": runs[0]["prompt_tokens"], "decode_tokens": decode,
            **{k: statistics.median(r[k] for r in runs) for k in keys}, "runs": runs}


def against_floors(measured: dict, floors: dict) -> dict:
    """Each floor with the measured value and whether it holds (lower is better for time and memory);
    a figure that was not measured is reported, not failed."""
    out = {}
    for key, floor in floors.items():
        value = measured.get(key)
        if value is None:
            out[key] = {"floor": floor, "measured": None, "pass": True, "note": "not measured here"}
            continue
        ok = value <= floor if key in LOWER_IS_BETTER else value >= floor
        out[key] = {"floor": floor, "measured": value, "pass": ok}
    return out


def read_plan(folder: Path) -> dict:
    """The bundle's plan.json (memory plan, speed model, floors); {} for a folder made without one."""
    path = folder / "plan.json"
    return json.loads(path.read_text()) if path.exists() else {}


def serve_and_check(backend, tokenizer, info: dict, folder: Path, transport: str, timeout: float) -> dict:
    """Start the agent's server here, talk to it through `transport` (mosquitto | in-process), run the
    golden and speed checks. Returns the part of the report they make."""
    from agent.config import AgentConfig

    plan = read_plan(folder)
    speed_test = plan.get("speed_test", DEFAULT_SPEED_TEST)
    golden = json.loads((folder / "golden.json").read_text())
    seed_text = " ".join(c["prompt"] for c in golden["cases"])
    settings = dict(device_id="device-test", telemetry_s=0, max_tokens=max(1024, speed_test["decode_tokens"]),
                    max_wait_s=0, queue_size=4)
    if transport == "mosquitto":
        from agent.client import AgentClient
        from agent.loopback import LocalMosquitto
        from agent.service import Agent

        with LocalMosquitto() as url:
            agent = Agent(AgentConfig(broker=url, **settings))
            try:
                agent.serve(backend, tokenizer, info)
                if not agent.transport.subscribed.wait(10):
                    raise RuntimeError(f"the agent did not subscribe on {url}: {agent.transport.last_error}")
                with AgentClient(url, "device-test") as client:
                    result = _checks(client, tokenizer, folder, speed_test, backend.max_seq, seed_text, timeout)
                result["server"] = agent.server.stats()
            finally:
                agent.stop()
        return {"transport": f"mqtt (private mosquitto at {url})", **result}
    from agent.loopback import InProcessClient, InProcessTransport
    from agent.server import AgentServer

    server = AgentServer(backend, tokenizer, AgentConfig(**settings), info)
    link = InProcessTransport(server.handle)
    server.start(link)
    try:
        result = _checks(InProcessClient(link, server.topics), tokenizer, folder, speed_test, backend.max_seq,
                         seed_text, timeout)
        result["server"] = server.stats()
    finally:
        server.stop()
    return {"transport": "in-process (no mosquitto here)", **result}


def _checks(client, tokenizer, folder, speed_test, max_seq, seed_text, timeout) -> dict:
    return {"golden": golden_through_server(client, tokenizer, folder, timeout),
            "speed": measure_speed(client, tokenizer, speed_test, max_seq, seed_text, timeout)}


def run_device_test(folder: Path, transport: str = "auto", max_batch: Optional[int] = None,
                    timeout: float = 300.0) -> dict:
    """The whole check; the report (JSON-ready) with `pass`."""
    from agent.backends import open_bundle
    from agent.gpu_memory import GpuMemory, host_memory
    from agent.loopback import mosquitto_binary

    folder = Path(folder)
    auto = transport == "auto"
    if auto:
        transport = "mosquitto" if mosquitto_binary() else "in-process"
    memory = GpuMemory().start()  # baseline before the model loads
    planned = read_plan(folder).get("memory") or {}
    need = sum(planned.get(k, 0) for k in ("weight_bytes", "kv_bytes", "compressed_key_bytes"))  # no estimates
    if memory.available and memory.total and need > memory.total - memory.baseline:
        memory.stop()
        raise AgentInputError(f"{folder}: its weights and caches need {need / 1e9:.1f} GB but only "
                              f"{(memory.total - memory.baseline) / 1e9:.1f} GB are free ({memory.name}): stop the "
                              f"agent first (sudo systemctl stop cpm-edge-agent), device-test loads the model itself")
    try:
        start = time.perf_counter()
        backend, tokenizer, info = open_bundle(folder, max_batch=max_batch or _bundle_batch(folder))
        load_s = time.perf_counter() - start
        logits = check_first_logits(backend, folder)
        try:
            served = serve_and_check(backend, tokenizer, info, folder, transport, timeout)
        except OSError as e:  # the private broker did not come up: say so and go on without the network
            if not auto:
                raise
            served = serve_and_check(backend, tokenizer, info, folder, "in-process", timeout)
            served["transport"] += f"; mosquitto could not start: {e}"
    finally:
        gpu = memory.stop()
    plan = read_plan(folder)
    golden = [{**g, **lg, "pass": g["tokens_match"] and lg["logits_pass"]} for g, lg in zip(served["golden"], logits)]
    measured = {k: served["speed"][k] for k in ("time_to_first_token_ms", "prefill_tokens_per_s",
                                                 "decode_tokens_per_s")}
    if gpu.get("measured"):
        measured["gpu_memory_gb"] = gpu["used_by_agent_gb"]
    floors = against_floors(measured, plan.get("floors", {}))
    ceilings = plan.get("speed_model", {}).get("ceilings", {})
    sane = {k: {"floor": plan["floors"][k], "ceiling": c, "pass": plan["floors"][k] < c}
            for k, c in ceilings.items() if k in plan.get("floors", {})}
    # A figure above its ceiling is not a failure of the device but of the model's inputs (a profile that
    # understates the bandwidth, or weights small enough to stay in a CPU's cache): reported, not failed.
    above = {k: {"measured": measured[k], "ceiling": c} for k, c in ceilings.items() if measured.get(k, 0) > c}
    return {"bundle": str(folder), "device": info.get("device"), "backend": info.get("backend"),
            "load_seconds": load_s, "transport": served["transport"], "golden": golden, "speed": served["speed"],
            "gpu_memory": gpu, "host_memory": host_memory(), "floors": floors, "floors_below_ceilings": sane,
            "above_ceilings": above,
            "memory_plan": plan.get("memory"), "server": served["server"],
            "pass": (all(g["pass"] for g in golden) and all(f["pass"] for f in floors.values())
                     and all(s["pass"] for s in sane.values()))}


def _bundle_batch(folder: Path) -> int:
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()).get("max_batch", 1) if manifest.exists() else 1
