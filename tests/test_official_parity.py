"""Parity with OpenBMB's official modeling code, when a harness that runs it is configured.

The official code is Hugging Face remote code (needs transformers and the model repo's .py files), so it
is not installed by the kit. Set CPM_OFFICIAL_HARNESS to a command with the interface of `cpm-edge logits`
(see bench/official_parity.py) to run this test; the last measured result is in
bench/results/official_parity.json.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = os.environ.get("CPM_OFFICIAL_HARNESS")


@pytest.mark.skipif(not HARNESS, reason="CPM_OFFICIAL_HARNESS is not set (no official MiniCPM4 code here)")
def test_logits_match_official_modeling_code():
    script = Path(__file__).resolve().parents[1] / "bench" / "official_parity.py"
    proc = subprocess.run([sys.executable, str(script), "--harness", HARNESS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
