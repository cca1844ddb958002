"""The generate loop of one rank: a prompt schedule in, chunks out to a callback, a summary back.

`ropesp generate` (each of its ranks) and scripts call `rank_session` (this rank's group and session)
and `write_video` (the stream into its files on rank 0) or `generate_stream` itself; the CLI keeps only
parsing and the progress/FPS lines (its callbacks). ropesp.Pipeline runs the same session loop
through runtime/group.py, which adds the lock-step protocol of a served group.

An unbounded stream (latent_frames None) runs until `stop()` says so; on a P-rank group rank 0's
answer is broadcast after every chunk, so all ranks stop after the same chunk.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ropesp import start_gc
from ropesp.runtime.dist import Mapping
from ropesp.runtime.session import Chunk, StreamSession, check_prompt_mode
from ropesp.video import OutputPaths, StreamOutputs


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


@contextlib.contextmanager
def rank_session(
    mapping: Mapping,
    res,
    lead_decoder: Callable[[torch.device], object],
    *,
    overlap_decode: bool | None = None,
    decode_device: str | None = None,
    unbounded: bool = False,
) -> Iterator[StreamSession]:
    """This rank's process group (runtime/launch.py process_group) and its session of the resolved
    pipeline `res`; only rank 0 decodes, with lead_decoder(its device). overlap_decode None: the
    session's default, except that a decoder on a device of its own (decode_device) overlaps."""
    from ropesp.runtime.launch import process_group
    from ropesp.runtime.pipeline import build_session

    with process_group(mapping, res.device) as device:
        decoder = lead_decoder(device) if mapping.is_first else None
        overlap = overlap_decode
        if overlap is None and decode_device:
            # a decoder on a device of its own only pays when the DiT goes on meanwhile (the default
            # keeps multi-rank runs serial; here rank 0's DiT thread issues its collectives)
            overlap = True
        yield build_session(res, mapping, decoder=decoder, overlap_decode=overlap, unbounded=unbounded)


def write_video(
    session: StreamSession,
    prompts: PromptSchedule,
    seed: int,
    paths: OutputPaths | None,
    on_chunk: Callable[[Chunk], None] | None = None,
    *,
    on_start: Callable[[Path | None], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> GenerateResult:
    """generate_stream into files: rank 0 (paths given) writes the MP4 (a .part file, playable while
    written), the PNG frames and the latents, replacing the outputs only when the stream ends well;
    the other ranks (paths None) run the same stream in lock-step. on_start(the .part path, or None)
    comes once the outputs are open, before the first chunk; on_chunk after each chunk is written."""
    with StreamOutputs(paths) if paths is not None else contextlib.nullcontext() as out:
        if on_start is not None:
            on_start(None if out is None else out.part_path)

        def each(chunk: Chunk) -> None:
            if out is not None:
                out.write(chunk.frames[0].numpy())
            start_gc.release()  # the process has started: collect again (ropesp/start_gc.py)
            if on_chunk is not None:
                on_chunk(chunk)

        keep = paths is not None and bool(paths.latents)
        result = generate_stream(session, prompts, seed, each, keep_latents=keep, stop=stop)
        if out is not None:  # only a stream that ended well replaces the outputs
            out.commit(torch.cat(result.latents, dim=1) if paths.latents else None)
    return result
