"""Shared fixtures: tiny MiniCPM4 folders made once per test session (no model hub)."""
from __future__ import annotations

import os

import pytest
import torch

pytest_plugins = ["mqtt_fixtures"]  # a Mosquitto per test and a scripted backend, for the agent tests

# Triton kernels run on CPU tensors in Triton's interpreter when there is no GPU. It must be chosen before
# any kernel module is imported (triton.jit reads it when it decorates).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# One Triton cache for the whole session: every ahead-of-time build for the same target (tests/test_aot.py,
# the bundles of tests/test_engine_bundle.py, ...) compiles the same configurations; Triton's own cache keys
# them by source, target and options, so a later build of sm_87 reuses the first one's cubins.
if "TRITON_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="cpm-edge-tests-triton-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)


def pytest_report_header(config):
    return [f"Triton kernels: {'interpreter on CPU' if os.environ.get('TRITON_INTERPRET') == '1' else 'CUDA'}"]


@pytest.fixture
def seed():
    """Fresh random inputs every run; the seed is printed so a failure can be replayed."""
    import random

    s = random.randrange(2**31)
    print(f"random seed {s}")
    torch.manual_seed(s)
    random.seed(s)
    return s


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of the tiny dense, sparse and ternary folders, keyed by variant."""
    from export.tiny import VARIANTS, write_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {v: write_tiny(root / v, v, seed=11) for v in VARIANTS}


@pytest.fixture(scope="session")
def tiny_dense(tiny_models):
    return tiny_models["dense"]
