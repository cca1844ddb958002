"""Rank functions for the spawned-world tests (importable by child processes)."""

from __future__ import annotations

import dataclasses

import torch

from ropesp.config import SamplerConfig
from ropesp.runtime.launch import process_group
from ropesp.runtime.pipeline import PipelineConfig, build_session
from ropesp.runtime.sp import CollectiveLog, Collectives


def base_config(**overrides) -> PipelineConfig:
    kw = dict(
        preset="tiny", latent_height=10, latent_width=14, latent_frames=6, device="cpu", dtype="float32"
    )
    kw.update(overrides)
    return PipelineConfig(**kw)


MODES = {
    "optimized": dict(sp_rope="local", sp_comm="fused"),
    "baseline": dict(sp_rope="allgather", sp_comm="unfused"),
    "rolling": dict(
        sp_rope="local", sp_comm="fused", local_attn_frames=4, sink_frames=1, latent_frames=9, max_frames=4
    ),
    "iff": dict(
        sp_rope="local", sp_comm="fused", latent_frames=7, sampler=SamplerConfig(independent_first_frame=True)
    ),
}


def run_modes(mapping, prompt, out_path, modes, ring_degree=None) -> None:
    """Generate once per mode on this rank; rank 0 saves {mode: latents, counts: {...}}."""
    results, counts = {}, {}
    with process_group(mapping, "cpu"):
        for mode in modes:
            cfg = base_config(world_size=mapping.world_size, ring_degree=ring_degree, **MODES[mode])
            log = CollectiveLog()  # sees the world's and (hybrid) the Ulysses group's collectives
            session = build_session(cfg, mapping, comm=Collectives(None, mapping.world_size, log))
            session.reset(prompt, seed=3)
            log.counts.clear()
            session.executor.forward(torch.zeros(1, 3, 16, 10, 14), torch.tensor(500.0), 0)
            counts[mode] = dict(log.counts)
            session.reset(seed=3)
            results[mode] = session.generate()
    if mapping.rank == 0:
        torch.save({"latents": results, "counts": counts}, out_path)


def build_only(mapping, ulysses_degree=None) -> None:
    """Every rank validates the layout itself (as under torchrun) and exits on a bad one."""
    with process_group(mapping, "cpu"):
        build_session(base_config(world_size=mapping.world_size, ulysses_degree=ulysses_degree), mapping)


def replace(cfg: PipelineConfig, **kw) -> PipelineConfig:
    return dataclasses.replace(cfg, **kw)


def fail_on_rank1(mapping) -> None:
    """Rank 1 fails while rank 0 waits in a collective: every rank must still exit promptly."""
    import torch.distributed as dist

    with process_group(mapping, "cpu"):
        if mapping.rank == 1:
            raise RuntimeError("boom on rank 1")
        dist.barrier()


SWITCH_CASES = {
    # name: (config overrides, {chunk: prompt index}, mode)
    "swap": (dict(latent_frames=9), {0: 0, 1: 1, 2: 2}, "swap"),
    "recache": (dict(latent_frames=9), {0: 0, 2: 1}, "recache"),
    # window 7 with 1 sink frame: before chunk 3 the replay is chunks 0 (sink) and 2, skipping chunk 1
    "recache-rolling": (dict(latent_frames=12, local_attn_frames=7, sink_frames=1), {0: 0, 3: 1}, "recache"),
}


def run_switches(mapping, prompts, out_path, cases=tuple(SWITCH_CASES), ring_degree=None) -> None:
    """Each case's stream with its prompt schedule on this rank (StreamSession.set_prompt at_chunk);
    rank 0 saves {case: latents}."""
    results = {}
    with process_group(mapping, "cpu"):
        for case in cases:
            overrides, schedule, mode = SWITCH_CASES[case]
            cfg = base_config(world_size=mapping.world_size, ring_degree=ring_degree, **overrides)
            session = build_session(cfg, mapping)
            session.reset(prompts[schedule[0]], seed=3)
            for chunk, index in schedule.items():
                if chunk:
                    session.set_prompt(prompts[index], mode, at_chunk=chunk)
            results[case] = session.generate()
    if mapping.rank == 0:
        torch.save(results, out_path)
