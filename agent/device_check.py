"""On-device regression: does a flashed device still give the right answers at the right speed?

Runs a bundle's golden cases (prompt ids -> greedy tokens and first-step logits made by the torch model on
the host) through the device's backend, then measures prefill and decode tokens/s, time to first token and
peak memory, and holds them to the floors of the bundle's device profile. Writes a JSON report.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np

# The engine computes in fp16/bf16, the golden logits come from fp32: compare shapes of the distribution,
# not bits. Greedy tokens must match exactly (a flipped argmax is a regression worth a look).
LOGITS_MIN_COSINE = 0.999
LOGITS_MAX_REL_ERROR = 0.05  # max |device - golden| / max |golden|


def check_golden(backend, folder: Path) -> list[dict]:
    golden = json.loads((folder / "golden.json").read_text())
    expected_logits = np.load(folder / "golden_logits.npy")
    results = []
    for case, ref in zip(golden["cases"], expected_logits):
        logits = backend.prefill(0, np.asarray(case["ids"], dtype=np.int64)).astype(np.float64)
        tokens, pos = [int(np.argmax(logits))], len(case["ids"])
        while len(tokens) < len(case["greedy"]):
            step = backend.decode(np.array([tokens[-1]]), np.array([pos]))[0]
            tokens.append(int(np.argmax(step)))
            pos += 1
        cosine = float(logits @ ref / (np.linalg.norm(logits) * np.linalg.norm(ref)))
        rel = float(np.abs(logits - ref).max() / np.abs(ref).max())
        results.append({"prompt": case["prompt"], "tokens_match": tokens == case["greedy"],
                        "first_mismatch": next((i for i, (a, b) in enumerate(zip(tokens, case["greedy"])) if a != b),
                                               None),
                        "logits_cosine": cosine, "logits_max_rel_error": rel,
                        "pass": tokens == case["greedy"] and cosine >= LOGITS_MIN_COSINE and rel <= LOGITS_MAX_REL_ERROR})
    return results


def measure_speed(backend, prompt_tokens: int = 512, decode_tokens: int = 64, vocab: int = 1000) -> dict:
    """Prefill and decode rates on random ids, one row, after one warm-up run."""
    rng = np.random.default_rng(0)
    prompt_tokens = min(prompt_tokens, backend.max_seq - decode_tokens - 1)
    ids = rng.integers(3, vocab, prompt_tokens)
    backend.prefill(0, ids[:16])  # warm-up: first launches load kernels and build graphs
    start = time.perf_counter()
    logits = backend.prefill(0, ids)
    first = time.perf_counter() - start
    token, pos = int(np.argmax(logits)), prompt_tokens
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(np.argmax(backend.decode(np.array([token]), np.array([pos]))[0]))
        pos += 1
    decode = time.perf_counter() - start
    return {"prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "prefill_tokens_per_s": prompt_tokens / first, "time_to_first_token_ms": 1000 * first,
            "decode_tokens_per_s": decode_tokens / decode,
            "peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def against_floors(speed: dict, floors: dict) -> dict:
    """Each floor with the measured value and whether it holds (lower is better for time and memory)."""
    out = {}
    for key, floor in floors.items():
        value = speed[key]
        ok = value <= floor if key in ("time_to_first_token_ms", "peak_memory_gb") else value >= floor
        out[key] = {"floor": floor, "measured": value, "pass": ok}
    return out


def run_checks(backend, folder: Path, floors: dict, vocab: int) -> dict:
    golden = check_golden(backend, folder)
    speed = measure_speed(backend, vocab=vocab)
    floor_results = against_floors(speed, floors)
    return {"golden": golden, "speed": speed, "floors": floor_results,
            "pass": all(g["pass"] for g in golden) and all(f["pass"] for f in floor_results.values())}
