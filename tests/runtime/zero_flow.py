"""A stand-in for the executor of StreamSession's tests: one tiny CPU layer, no KV cache, flow = 0."""

from __future__ import annotations

import torch

from ropesp.config import ModelConfig


class ZeroFlowExecutor:
    """Flow = 0, so x0 = x_t: a session over it shows its own noise and chunking, nothing of a model.
    Subclasses record or delay forward() [B, F, C, H, W] -> zeros of the same shape."""

    cfg = ModelConfig(dim=24, ffn_dim=8, num_heads=2, num_layers=1)
    device = torch.device("cpu")
    cuda_graphs = False
    world_size = 1
    comm = None
    cache_cfg = None  # no KV cache: nothing to re-cache
    has_prompt = True
    slots = 1

    def use_slot(self, slot):
        assert slot == 0

    def set_prompt(self, p):
        pass

    def forward(self, x, t, start_frame):
        return torch.zeros_like(x)
