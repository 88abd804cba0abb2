"""On a flashed NVIDIA device: `make test-device` runs `cpm-edge device-test`; this wraps it for pytest -m gpu.

Skipped elsewhere, with the reason printed (-ra): these checks need TensorRT, pycuda and a GPU.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BUNDLE = Path(os.environ.get("CPM_EDGE_BUNDLE", "/opt/cpm-edge/bundle"))


def no_device_reason() -> str:
    if shutil.which("nvidia-smi") is None and not Path("/proc/device-tree/model").exists():
        return "no NVIDIA GPU here (nvidia-smi not found, not a Jetson)"
    if not (BUNDLE / "manifest.json").exists():
        return f"no flashed bundle at {BUNDLE} (set CPM_EDGE_BUNDLE)"
    try:
        import pycuda  # noqa: F401
    except ImportError:
        return "pycuda is not installed (it comes with the device setup)"
    return ""


@pytest.mark.gpu
@pytest.mark.skipif(bool(no_device_reason()), reason=no_device_reason() or "device present")
def test_flashed_device_gives_golden_answers_at_profile_speed(tmp_path):
    exe = Path(sys.executable).with_name("cpm-edge")
    proc = subprocess.run([str(exe), "device-test", "--bundle", str(BUNDLE), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
