"""What every rank of an engine applies, in lock-step: the `Tick` rank 0's engine core sends (streams
opened, prompts changed, streams closed, the stream stepped now) and the `RankEngine` that applies it to
its executor's KV cache slots and stream sessions. Rank 0 runs one in-process (runtime/engine_core.py);
ranks 1..P-1 run `follow` (runtime/worker.py) until told to stop."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ropesp.runtime.dist import Mapping, destroy_process_group, set_collective_timeout
from ropesp.runtime.pipeline import ResolvedPipeline, build_executor, resolve_rank
from ropesp.runtime.ranks import RankGroup
from ropesp.runtime.session import DitChunk, StreamSession
from ropesp.settings import RunConfig


@dataclass
class OpenOp:
    stream: int
    slot: int
    seed: int
    latent_frames: int | None
    change_chunks: list[int]
    change_mode: str


@dataclass
class Tick:
    """One step of the engine loop, the same on every rank. Its tensors travel in order: each open's
    prompt and scheduled changes, then each prompt change's."""

    opens: list[OpenOp] = field(default_factory=list)
    prompts: list[tuple[int, str]] = field(default_factory=list)
    """(stream, mode) of each prompt change."""
    closes: list[int] = field(default_factory=list)
    step: int | None = None
    """The stream whose next chunk every rank computes now."""

    def __bool__(self) -> bool:
        return bool(self.opens or self.prompts or self.closes or self.step is not None)


class RankEngine:
    """One rank's executor (with a KV cache slot per stream) and the sessions of its streams."""

    def __init__(self, res: ResolvedPipeline, mapping: Mapping) -> None:
        self.res = res
        self.executor = build_executor(res, mapping)
        self.sessions: dict[int, tuple[StreamSession, Iterator[DitChunk]]] = {}
        if mapping.world_size > 1:  # every rank is built: bound the waits from here on
            set_collective_timeout(res.collective_timeout_s)

    def apply(self, tick: Tick, tensors: Sequence[torch.Tensor]) -> DitChunk | None:
        """Apply one tick; returns the stepped stream's chunk (None when nothing was stepped). A bounded
        stream's session is dropped after its last chunk, on every rank alike."""
        res, pending = self.res, list(tensors)
        for stream in tick.closes:  # first: a slot freed here may serve a stream opened below
            self._drop(stream)
        for op in tick.opens:
            with torch.profiler.record_function(f"ropesp.open{op.stream}"):
                session = StreamSession(
                    self.executor, res.config.sampler, res.geometry, op.latent_frames, slot=op.slot
                )
                session.reset(pending.pop(0), op.seed)
                for k in op.change_chunks:
                    session.set_prompt(pending.pop(0), op.change_mode, at_chunk=k)
                self.sessions[op.stream] = (session, session.dit_chunks())
        for stream, mode in tick.prompts:
            prompt = pending.pop(0)
            if stream in self.sessions:
                self.sessions[stream][0].set_prompt(prompt, mode)
        if tick.step is None or tick.step not in self.sessions:
            return None
        session, chunks = self.sessions[tick.step]
        item = next(chunks)
        if session.is_last(item.index):
            self._drop(tick.step)
        return item

    def _drop(self, stream: int) -> None:
        entry = self.sessions.pop(stream, None)
        if entry is not None:
            entry[1].close()


def follow(group: RankGroup) -> None:
    """A follower rank: build its RankEngine when told, apply every tick, until SHUTDOWN."""
    engine: list[RankEngine] = []

    def build(raw, _tensors) -> None:
        res, mapping = resolve_rank(RunConfig.from_dict(raw), group.mapping, default_model=False)
        engine.append(RankEngine(res, mapping))

    def tick(t: Tick, tensors) -> None:
        engine[0].apply(t, tensors)

    try:
        group.follow({"build": build, "tick": tick})
    finally:
        engine.clear()  # its CUDA graphs captured NCCL calls: gone before the group
        destroy_process_group()
