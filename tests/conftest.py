"""Shared fixtures: the tiny model with seeded random weights, and CPU-friendly defaults."""

from __future__ import annotations

import pytest
import torch

from ropesp.config import tiny
from ropesp.model.wan import CausalWanDiT, init_weights

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny()


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    model = CausalWanDiT(tiny_cfg)
    init_weights(model, 0)
    return model.eval()


@pytest.fixture(scope="session")
def prompt(tiny_cfg):
    g = torch.Generator("cpu").manual_seed(7)
    return torch.randn(1, 20, tiny_cfg.text_dim, generator=g) * 0.1
