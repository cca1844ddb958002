"""The generate loop of one rank: a prompt schedule in, chunks out to a callback, a summary back.

`ropesp generate` (each of its ranks) and scripts call `generate_stream`; the CLI keeps only parsing,
the writer and the progress/FPS lines (its `on_chunk`). ropesp.Pipeline runs the same session loop
through runtime/group.py, which adds the lock-step protocol of a served group.

An unbounded stream (latent_frames None) runs until `stop()` says so; on a P-rank group rank 0's
answer is broadcast after every chunk, so all ranks stop after the same chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ropesp.runtime.session import Chunk, StreamSession, check_prompt_mode


@dataclass(frozen=True)
class PromptSchedule:
    """The prompt a stream starts with and the changes at chunk boundaries."""

    first: torch.Tensor
    """[1, L, text_dim] embeddings of chunk 0 on."""
    changes: tuple[tuple[int, torch.Tensor], ...] = ()
    """(chunk index k >= 1, embeddings): the prompt from chunk k on."""
    mode: str = "swap"
    """How every change treats the self-attention cache: swap | recache (runtime/session.py)."""

    def __post_init__(self) -> None:
        check_prompt_mode(self.mode)


@dataclass
class GenerateResult:
    """What rank 0 reports after the stream."""

    chunks: int = 0
    latent_frames: int = 0
    first_chunk_ms: float | None = None
    total_ms: float = 0.0
    latents: list[torch.Tensor] = field(default_factory=list)
    """Every chunk's latents [B, F_chunk, C, h, w] (keep_latents=True only)."""


def _agree(stop: bool, world_size: int, device: torch.device) -> bool:
    """Rank 0's stop decision on every rank (a broadcast of one flag; free at world size 1)."""
    if world_size == 1:
        return stop
    import torch.distributed as dist

    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(stop)], dtype=torch.int32, device=where)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def generate_stream(
    session: StreamSession,
    prompts: PromptSchedule,
    seed: int,
    on_chunk: Callable[[Chunk], None] | None = None,
    *,
    keep_latents: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> GenerateResult:
    """Run one stream on this rank: reset to prompts.first and seed, queue the prompt changes at their
    chunks, iterate, hand every chunk to on_chunk (rank 0's writer/progress). stop() is asked after each
    chunk of an unbounded stream (rank 0's answer counts). The stream is closed on errors too (an
    overlapped DiT thread stops)."""
    session.reset(prompts.first, seed)
    for chunk_index, embeds in prompts.changes:
        session.set_prompt(embeds, prompts.mode, at_chunk=chunk_index)
    result = GenerateResult()
    unbounded = session.chunk_sizes is None
    device = torch.device(session.executor.device)
    t0 = time.perf_counter()
    stream = iter(session)
    try:
        for chunk in stream:
            if keep_latents:
                result.latents.append(chunk.latents)
            result.chunks += 1
            result.latent_frames += chunk.latents.shape[1]
            if result.first_chunk_ms is None:
                result.first_chunk_ms = chunk.elapsed_ms
            result.total_ms = chunk.elapsed_ms
            if on_chunk is not None:
                on_chunk(chunk)
            if unbounded and _agree(bool(stop()), session.world_size, device):
                break
    finally:
        stream.close()
    if not result.chunks:
        result.total_ms = (time.perf_counter() - t0) * 1e3
    return result
