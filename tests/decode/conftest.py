"""Shared by the decoder tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny VAE's convolutions are too small to gain from threads; on a busy 2-core machine, OpenMP
    threads slow them down 10-20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
