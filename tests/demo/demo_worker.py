"""Rank function of the demo's tests on P CPU ranks (importable by the spawned ranks; run on every rank by
the engine's launcher, runtime/ranks.py RankGroup.call)."""

from __future__ import annotations

import torch

from ropesp.demo import default_checkpoint
from ropesp.demo.evaluate import generate_latents
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig


def generate_pairs(mapping, pairs, overrides) -> list | None:
    """Generate every (prompt, seed) pair on this rank (the shipped model unless overrides name another);
    rank 0 returns the latents."""
    with torch.no_grad():
        kw = {"checkpoint": str(default_checkpoint()), "device": "cpu", "dtype": "float32", **overrides}
        cfg = RunConfig.of(world_size=mapping.world_size, **kw)
        latents = generate_latents(build_session(cfg, mapping), pairs)
    return latents if mapping.rank == 0 else None


def on_ranks(world_size: int, fn, *args):
    """fn(mapping, *args) on world_size CPU ranks (this process is rank 0); rank 0's result."""
    from ropesp.runtime.ranks import run_on_ranks

    return run_on_ranks(world_size, "cpu", fn, *args)


def generate_streams_on_rank(mapping, jobs) -> list | None:
    """The long-stream jobs (ropesp.demo.long_stream) on this rank with the page's window; rank 0 returns
    the latents."""
    from ropesp.demo.long_stream import PAGE_WINDOW, generate_streams

    with torch.no_grad():
        cfg = RunConfig.of(
            checkpoint=str(default_checkpoint()),
            device="cpu",
            dtype="float32",
            world_size=mapping.world_size,
            local_attn_frames=PAGE_WINDOW.local_attn_frames,
            sink_frames=PAGE_WINDOW.sink_frames,
        )
        latents = generate_streams(cfg, jobs, mapping)
    return latents if mapping.rank == 0 else None
