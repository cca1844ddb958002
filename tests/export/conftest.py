"""Shared engine builds for the export tests: ONE session-scoped build per backend and world size.

Tiny preset (2 layers), latents 10x14 -> a 5x7 token grid, 105 tokens per 3-frame chunk (not divisible
by 2: the SP tail padding is exercised), 6 latent frames (2 chunks), fp32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from engine_builds import FRAMES, GRID, Builds, run_generate


@pytest.fixture(scope="session")
def builds(tmp_path_factory) -> Builds:
    return Builds(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="session")
def eager_latents(tmp_path_factory) -> torch.Tensor:
    """The eager reference on one rank (every world size equals it: tests/runtime/test_sp.py)."""
    tmp = tmp_path_factory.mktemp("eager")
    return run_generate(tmp, "--preset", "tiny", *GRID, *FRAMES, "--device", "cpu", "--dtype", "float32")
