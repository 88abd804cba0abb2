"""Compare `cpm-edge logits` with OpenBMB's official MiniCPM4 modeling code, fp32 on CPU.

The official code (modeling_minicpm.py, Hugging Face remote code) is not part of this kit and needs
transformers; point --harness at a command that runs it with the same interface as `cpm-edge logits`:
    HARNESS MODEL_DIR --input-ids 1,2,3 [--input-ids ...] --out FILE.npy
(e.g. a script that loads MODEL_DIR with trust_remote_code, attn_implementation="eager", use_cache=False).

    python bench/official_parity.py --harness "/path/venv/bin/python /path/official_logits.py"

Cases: the tiny tied model, an untied model whose context was extended (long LongRoPE factors on every
position and a cos/sin scale != 1), and a BitCPM4-style ternary model. Writes bench/results/official_parity.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "official_parity.json"
TOLERANCE = 1e-4  # max |ours - official| / max |official|, per case

CASES = {
    "tied": dict(variant="dense"),
    "untied_long_rope": dict(variant="dense", tie_word_embeddings=False, max_position_embeddings=4096),
    "ternary": dict(variant="ternary"),
}


def run(cmd: list[str]):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--harness", required=True, help="command that runs the official code (see above)")
    parser.add_argument("--seq", type=int, default=48, help="tokens per row (48)")
    parser.add_argument("--batch", type=int, default=2, help="rows (2)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from export.tiny import write_tiny

    cpm = str(Path(sys.executable).with_name("cpm-edge"))
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    report = {"seed": seed, "machine": platform.machine(), "tolerance": TOLERANCE, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, spec in CASES.items():
            spec = dict(spec)
            model = write_tiny(tmp / name, spec.pop("variant"), seed=rng.randrange(1000), **spec)
            rows = [[rng.randrange(3, 510) for _ in range(args.seq)] for _ in range(args.batch)]
            ids = [a for r in rows for a in ("--input-ids", ",".join(map(str, r)))]
            run([cpm, "logits", str(model), *ids, "--out", str(tmp / f"{name}.ours.npy")])
            run([*shlex.split(args.harness), str(model), *ids, "--out", str(tmp / f"{name}.official.npy")])
            ours, official = np.load(tmp / f"{name}.ours.npy"), np.load(tmp / f"{name}.official.npy")
            if ours.shape != official.shape:
                sys.exit(f"{name}: shapes differ {ours.shape} vs {official.shape}")
            rel = float(np.abs(ours - official).max() / np.abs(official).max())
            same_argmax = float((ours.argmax(-1) == official.argmax(-1)).mean())
            report["cases"][name] = {"shape": list(ours.shape), "max_rel_error": rel,
                                     "argmax_agreement": same_argmax, "pass": rel <= TOLERANCE}
            print(f"{name:18s} max relative error {rel:.2e}  argmax agreement {same_argmax:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0 if all(c["pass"] for c in report["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
