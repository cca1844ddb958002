"""Streaming session: executor + sampler + decoder, yielding each chunk as soon as it is done.

A session owns one stream at a time; `reset(prompt_embeds, seed)` starts a new one without
reallocating caches. Iterating yields `Chunk`s in order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from ropesp.runtime.executor import Executor
from ropesp.runtime.sampler import FlowSchedule, NoiseStream

from ropesp.config import SamplerConfig, VideoGeometry
from ropesp.decode.base import StreamDecoder


@dataclass
class Chunk:
    """One finished chunk of the stream."""

    index: int
    """Chunk number, from 0."""
    start_frame: int
    """Absolute latent frame of the chunk's first frame."""
    latents: torch.Tensor
    """[B, F_chunk, C, h, w] float32 on the CPU: the chunk's final x0."""
    frames: torch.Tensor | None
    """[B, N, H, W, 3] uint8 decoded frames, or None without a decoder."""
    elapsed_ms: float
    """Milliseconds from the start of the stream to this chunk being ready (decode included)."""


class StreamSession:
    """Few-step causal generation, one chunk at a time."""

    def __init__(
        self,
        executor: Executor,
        sampler: SamplerConfig,
        geometry: VideoGeometry,
        latent_frames: int,
        decoder: StreamDecoder | None = None,
        batch: int = 1,
        skip_final_refresh: bool = True,
    ) -> None:
        self.executor = executor
        self.sampler = sampler
        self.schedule = FlowSchedule(sampler)
        self.geometry = geometry
        self.chunk_sizes = sampler.chunk_sizes(latent_frames)
        self.latent_frames = latent_frames
        self.decoder = decoder
        self.batch = batch
        self.skip_final_refresh = skip_final_refresh
        self.seed = 0
        self._ready = False

    def reset(self, prompt_embeds: torch.Tensor | None = None, seed: int | None = None) -> None:
        """Start a new stream; a new prompt recomputes the cross-attention K/V."""
        if prompt_embeds is not None:
            self.executor.set_prompt(prompt_embeds)
        if seed is not None:
            self.seed = int(seed)
        self.executor.reset()
        if self.decoder is not None:
            self.decoder.reset()
        self._ready = True

    def __iter__(self) -> Iterator[Chunk]:
        if not self._ready:
            raise RuntimeError("call reset(prompt_embeds, seed) before iterating a session")
        self._ready = False
        noise = NoiseStream(self.seed)
        c = self.executor.cfg.in_dim
        h, w = self.geometry.latent_height, self.geometry.latent_width
        steps = self.schedule.timesteps
        t0 = time.perf_counter()
        start = 0
        for index, n in enumerate(self.chunk_sizes):
            shape = (self.batch, n, c, h, w)
            x = noise.draw(shape)
            x0 = x
            for i in range(len(steps)):
                t = steps[i]
                flow = self.executor.forward(x, t, start)
                x0 = self.schedule.to_x0(x.to(flow.device), flow, t)
                if i + 1 < len(steps):
                    eps = noise.draw(shape)
                    x = self.schedule.add_noise(x0, eps.to(x0.device), steps[i + 1])
            last = index == len(self.chunk_sizes) - 1
            if not (last and self.skip_final_refresh):
                # clean-context pass: overwrites this chunk's cache slots; the output is not used
                self.executor.forward(x0, torch.tensor(self.schedule.context_t), start)
            latents = x0.cpu()
            frames = self.decoder.decode(latents) if self.decoder is not None else None
            yield Chunk(index, start, latents, frames, (time.perf_counter() - t0) * 1e3)
            start += n

    def generate(self) -> torch.Tensor:
        """Run the whole stream; returns latents [B, F, C, h, w] float32."""
        return torch.cat([chunk.latents for chunk in self], dim=1)
