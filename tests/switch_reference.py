"""Prompt changes mid-stream computed by definition, straight on an executor (no StreamSession).

docs/MODEL.md's sampler, chunk by chunk from one seeded CPU generator; before chunk k of the schedule the
executor gets the new prompt's cross-attention K/V ("swap"), and for "recache" its cache is cleared and
the clean-context pass (t = 0) re-runs over the x0 of the cached chunks in order: every earlier chunk
with global attention; with a rolling window the chunks holding sink frames and those whose frames
reach into the next chunk's window (its newest local_attn_frames - sink_frames frames). For "cut" the
cache is cleared and the stream goes on as a new one: positions from frame 0, nothing replayed.
"""

from __future__ import annotations

import torch

from ropesp.config import CacheConfig
from ropesp.runtime.sampler import FlowSchedule
from ropesp.settings import SamplerConfig


def generate_with_switches(
    executor,
    sampler: SamplerConfig,
    cache: CacheConfig,
    latent_size: tuple[int, int],
    chunks: list[int],
    prompts: dict[int, torch.Tensor],
    seed: int,
    mode: str,
) -> torch.Tensor:
    """Latents [1, F, C, h, w] of a stream whose prompt is prompts[k] from chunk k on (prompts[0] first)."""
    schedule = FlowSchedule(sampler)
    steps, sigmas = schedule.timesteps, schedule.step_sigmas
    g = torch.Generator("cpu").manual_seed(seed)
    shape = lambda n: (1, n, executor.cfg.in_dim, *latent_size)  # noqa: E731
    executor.set_prompt(prompts[0])
    executor.reset()
    done: list[tuple[int, int, torch.Tensor]] = []
    out, start = [], 0
    for k, n in enumerate(chunks):
        if k > 0 and k in prompts:
            executor.set_prompt(prompts[k])
            if mode == "cut":
                executor.reset()
                done, start = [], 0
            if mode == "recache":
                if cache.rolling:
                    cutoff = start + n - (cache.local_attn_frames - cache.sink_frames)
                    replay = [c for c in done if c[0] < cache.sink_frames or c[0] + c[1] > cutoff]
                else:
                    replay = done
                executor.reset()
                for s0, _, x0 in replay:
                    executor.forward(x0, torch.tensor(0.0), s0)
        x = torch.randn(shape(n), generator=g)
        for i in range(len(steps)):
            flow = executor.forward(x, steps[i], start).float().cpu()
            x0 = schedule.to_x0(x, flow, sigmas[i])
            if i + 1 < len(steps):
                x = schedule.add_noise(x0, torch.randn(shape(n), generator=g), sigmas[i + 1])
        out.append(x0)
        done.append((start, n, x0))
        if k + 1 < len(chunks):
            executor.forward(x0, torch.tensor(0.0), start)  # the clean-context pass
        start += n
    return torch.cat(out, dim=1)
