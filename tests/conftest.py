"""Shared fixtures: tiny MiniCPM4 folders made once per test session (no model hub)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of the tiny dense, sparse and ternary folders, keyed by variant."""
    from export.tiny import VARIANTS, write_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {v: write_tiny(root / v, v, seed=11) for v in VARIANTS}


@pytest.fixture(scope="session")
def tiny_dense(tiny_models):
    return tiny_models["dense"]
