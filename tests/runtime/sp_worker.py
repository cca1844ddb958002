"""Rank functions for the tests of worlds of P CPU ranks (importable by the spawned ranks), run on every
rank by the engine's own launcher and protocol (runtime/ranks.py RankGroup.call)."""

from __future__ import annotations

import torch

from ropesp.runtime.pipeline import build_session
from ropesp.runtime.ranks import run_on_ranks
from ropesp.runtime.sp import CollectiveLog, Collectives
from ropesp.settings import RunConfig


def on_ranks(world_size: int, fn, *args):
    """fn(mapping, *args) on world_size CPU ranks (this process is rank 0); rank 0's result."""
    return run_on_ranks(world_size, "cpu", fn, *args)


def base_config(**overrides) -> RunConfig:
    kw = dict(
        preset="tiny", latent_height=10, latent_width=14, latent_frames=6, device="cpu", dtype="float32"
    )
    kw.update(overrides)
    return RunConfig.of(**kw)


MODES = {
    "optimized": dict(sp_rope="local", sp_comm="fused"),
    "baseline": dict(sp_rope="allgather", sp_comm="unfused"),
    "rolling": dict(
        sp_rope="local", sp_comm="fused", local_attn_frames=4, sink_frames=1, latent_frames=9, max_frames=4
    ),
    "iff": dict(sp_rope="local", sp_comm="fused", latent_frames=7, independent_first_frame=True),
}


def run_modes(mapping, prompt, modes, ring_degree=None) -> dict | None:
    """Generate once per mode on this rank; rank 0 returns {"latents": {mode: ...}, "counts": {...}}."""
    results, counts = {}, {}
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
    return {"latents": results, "counts": counts} if mapping.rank == 0 else None


def build_only(mapping, ulysses_degree=None) -> None:
    """Every rank validates the layout itself (as under torchrun) and exits on a bad one."""
    build_session(base_config(world_size=mapping.world_size, ulysses_degree=ulysses_degree), mapping)


def replace(cfg: RunConfig, **kw) -> RunConfig:
    return cfg.replace(**kw)


def fail_on_rank1(mapping) -> None:
    """Rank 1 fails while rank 0 waits in a collective: every rank must still exit promptly."""
    import torch.distributed as dist

    if mapping.rank == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()


SWITCH_CASES = {
    # name: (config overrides, {chunk: prompt index}, mode)
    "swap": (dict(latent_frames=9), {0: 0, 1: 1, 2: 2}, "swap"),
    "recache": (dict(latent_frames=9), {0: 0, 2: 1}, "recache"),
    # window 7 with 1 sink frame: before chunk 3 the replay is chunks 0 (sink) and 2, skipping chunk 1
    "recache-rolling": (dict(latent_frames=12, local_attn_frames=7, sink_frames=1), {0: 0, 3: 1}, "recache"),
    # a new scene before chunk 2: chunk 2 is the new stream's chunk 0 (frames 0-2, its sink), chunk 3 its 1
    "cut-rolling": (dict(latent_frames=12, local_attn_frames=7, sink_frames=1), {0: 0, 2: 1}, "cut"),
}


def run_switches(mapping, prompts, cases=tuple(SWITCH_CASES), ring_degree=None) -> dict | None:
    """Each case's stream with its prompt schedule on this rank (StreamSession.set_prompt at_chunk);
    rank 0 returns {case: latents}."""
    results = {}
    for case in cases:
        overrides, schedule, mode = SWITCH_CASES[case]
        cfg = base_config(world_size=mapping.world_size, ring_degree=ring_degree, **overrides)
        session = build_session(cfg, mapping)
        session.reset(prompts[schedule[0]], seed=3)
        for chunk, index in schedule.items():
            if chunk:
                session.set_prompt(prompts[index], mode, at_chunk=chunk)
        results[case] = session.generate()
    return results if mapping.rank == 0 else None
