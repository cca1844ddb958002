"""Rank function of the demo's spawned-world tests (importable by child processes)."""

from __future__ import annotations

import torch

from ropesp.demo import default_checkpoint
from ropesp.demo.evaluate import generate_latents
from ropesp.runtime.launch import process_group
from ropesp.runtime.pipeline import PipelineConfig, build_session


def generate_pairs(mapping, pairs, out_path, overrides) -> None:
    """Generate every (prompt, seed) pair on this rank (the shipped model unless overrides name another);
    rank 0 saves the latents."""
    with process_group(mapping, "cpu"), torch.no_grad():
        kw = {"checkpoint": str(default_checkpoint()), "device": "cpu", "dtype": "float32", **overrides}
        cfg = PipelineConfig(world_size=mapping.world_size, **kw)
        latents = generate_latents(build_session(cfg, mapping), pairs)
    if mapping.rank == 0:
        torch.save(latents, out_path)


def generate_streams_on_rank(mapping, jobs, out_path) -> None:
    """The long-stream jobs (ropesp.demo.long_stream) on this rank with the page's window; rank 0 saves
    the latents."""
    from ropesp.demo.long_stream import PAGE_WINDOW, generate_streams

    with process_group(mapping, "cpu"), torch.no_grad():
        cfg = PipelineConfig(
            checkpoint=str(default_checkpoint()),
            device="cpu",
            dtype="float32",
            world_size=mapping.world_size,
            local_attn_frames=PAGE_WINDOW.local_attn_frames,
            sink_frames=PAGE_WINDOW.sink_frames,
        )
        latents = generate_streams(cfg, jobs, mapping)
    if mapping.rank == 0:
        torch.save(latents, out_path)
