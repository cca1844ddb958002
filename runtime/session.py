"""Streaming session: executor + sampler + decoder, yielding each chunk as soon as it is done.

A session owns one stream at a time; `reset(prompt_embeds, seed)` starts a new one without
reallocating caches. Iterating yields `Chunk`s in order; `latent_frames=None` streams until the
iterator is closed (a rolling window keeps the cache bounded).

Prompt changes (`set_prompt`, thread-safe) take effect at a chunk boundary, before the chunk's first
forward, in one of three modes:
    swap     the cross-attention K/V of the new prompt from that chunk on; the self-attention cache
             keeps what the earlier chunks computed under the old prompt.
    recache  also recompute the self-attention cache under the new prompt (LongLive's KV re-cache):
             the cache is cleared and the clean-context pass (t = context_noise) re-runs over the x0
             latents of the cached chunks, in order, at their stream positions: every earlier chunk
             with global attention; with a rolling window the chunks holding the sink frames and those
             the next chunk's window reaches (a skipped span keeps only the sink before it:
             SlotPlanner.plan). Cost: one forward per replayed chunk.
    cut      a new scene: the cache is cleared and the stream goes on as a new one under the new prompt
             (positions from frame 0, chunk 0 its new sink), as a fresh stream's first chunks would be;
             chunk indices keep counting. Cost: nothing.
The noise stream does not change, so a seed and the chunk indices of the switches fix the latents on
every backend and world size; each Chunk says which switch came into effect before it.

Overlapped decode (`overlap_decode=True`, the default with a decoder on CUDA): the DiT loop runs in a
producer thread (on its own CUDA stream on GPU) that hands each finished chunk's latents over a queue;
the iterator decodes them (on another CUDA stream on GPU) and yields. So chunk c is decoded while the DiT
already computes chunk c+1, and chunk c is yielded as soon as its decode is done. The producer draws the
same noise in the same order and runs the same forwards, so the results are identical to the serial path.
An exception in the producer is re-raised by the iterator; closing the iterator (or an error, or `reset`)
stops the producer before its next forward and joins it, so no thread outlives its stream.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ropesp.config import CacheConfig, VideoGeometry
from ropesp.decode.base import StreamDecoder, to_host
from ropesp.errors import ConfigError, arg
from ropesp.runtime.executor import Executor, check_prompt_embeds
from ropesp.runtime.sampler import FlowSchedule, NoiseStream
from ropesp.settings import PROMPT_MODES, SamplerConfig

MAX_AHEAD_UNBOUNDED = 2
"""Chunks an unbounded stream's DiT thread may finish before the consumer takes them (memory stays flat)."""


@dataclass
class Chunk:
    """One finished chunk of the stream, or a piece of one (`decode_pieces`)."""

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
    dit_ms: float = 0.0
    """Host milliseconds of this chunk's DiT work (its denoising forwards, and a switch before them)."""
    decode_ms: float = 0.0
    """Milliseconds of this chunk's decode (0 without a decoder)."""
    switch: str | None = None
    """The prompt change that came into effect right before this chunk ("swap" | "recache" | "cut"), if any."""
    switch_ms: float = 0.0
    """Host milliseconds of that change (the new prompt's K/V, and a re-cache's replayed forwards)."""
    prompt_version: int = 0
    """Prompt changes applied in this stream up to this chunk (0: the prompt it started with)."""


@dataclass(frozen=True)
class DitChunk:
    """One chunk as the DiT finished it, before decoding."""

    index: int
    start_frame: int
    latents: torch.Tensor
    """[B, F_chunk, C, h, w] float32 on the CPU."""
    info: dict
    """dit_ms, switch, switch_ms, prompt_version (Chunk's fields)."""


@dataclass(frozen=True, eq=False)
class PromptSwitch:
    """A queued prompt change."""

    prompt_embeds: torch.Tensor
    """[1, L, text_dim]."""
    mode: str = "swap"
    at_chunk: int | None = None
    """The chunk it comes into effect before; None: the next chunk the DiT starts."""


@dataclass(frozen=True)
class _Cached:
    """A finished chunk the cache may have to be recomputed from (re-cache)."""

    start: int
    frames: int
    x0: torch.Tensor
    """[B, frames, C, h, w] float32 on the executor's device."""


def finished_chunk(item: DitChunk, frames: torch.Tensor | None, elapsed_ms: float, decode_ms: float) -> Chunk:
    """The Chunk of a DiT chunk and its decoded frames."""
    return Chunk(
        item.index, item.start_frame, item.latents, frames, elapsed_ms, decode_ms=decode_ms, **item.info
    )


def decode_pieces(item: DitChunk, early_first_frame: bool) -> list[DitChunk]:
    """The pieces a finished chunk is decoded and handed over in: the chunk itself; with early_first_frame a
    stream's first chunk of more than one latent frame comes as latent frame 0 (its one video frame, the
    first a viewer sees, decoded in a fraction of the chunk's time) and then the rest. Both pieces keep the
    chunk's index; the second starts one latent frame later and carries no DiT or switch time of its own.
    The causal decoders carry their state frame by frame, so the frames are the chunk's own."""
    if not early_first_frame or item.index != 0 or item.latents.shape[1] < 2:
        return [item]
    rest = {**item.info, "dit_ms": 0.0, "switch": None, "switch_ms": 0.0}
    return [
        DitChunk(item.index, item.start_frame, item.latents[:, :1], item.info),
        DitChunk(item.index, item.start_frame + 1, item.latents[:, 1:], rest),
    ]


def check_prompt_mode(mode: str, name: str = "mode") -> str:
    if mode not in PROMPT_MODES:
        raise ConfigError(f"{arg(name, mode)}: choose one of {', '.join(PROMPT_MODES)}")
    return mode


def check_unbounded(cache: CacheConfig) -> None:
    """An unbounded stream needs a rolling window (the cache would overflow)."""
    if not cache.rolling:
        raise ConfigError(
            "an unbounded stream needs a rolling window (the KV cache would overflow): set "
            f"{arg('local_attn_frames')} (sink frames included) and {arg('sink_frames')}"
        )


class _Stopped(Exception):
    """The consumer asked the producer to stop (raised inside the producer thread only)."""


_DONE = object()


class StreamSession:
    """Few-step causal generation, one chunk at a time."""

    def __init__(
        self,
        executor: Executor,
        sampler: SamplerConfig,
        geometry: VideoGeometry,
        latent_frames: int | None,
        decoder: StreamDecoder | None = None,
        batch: int = 1,
        skip_final_refresh: bool = True,
        overlap_decode: bool | None = None,
        slot: int = 0,
        early_first_frame: bool = False,
    ) -> None:
        """slot: the executor's stream slot (KV cache and prompt K/V) this session's stream uses;
        early_first_frame: yield the first chunk's first video frame apart (`decode_pieces`)."""
        self.executor = executor
        self.slot = slot
        self.sampler = sampler
        self.schedule = FlowSchedule(sampler)
        self.geometry = geometry
        self.cache_cfg: CacheConfig | None = executor.cache_cfg
        """The executor's cache geometry (None for an executor without a cache: no re-cache)."""
        if latent_frames is None and self.cache_cfg is not None:
            check_unbounded(self.cache_cfg)
        self.chunk_sizes = sampler.chunk_sizes(latent_frames) if latent_frames is not None else None
        """Frames of every chunk; None for an unbounded stream (chunk_size(i) still answers)."""
        self.latent_frames = latent_frames
        self.decoder = decoder
        self.batch = batch
        self.skip_final_refresh = skip_final_refresh
        self.overlap_decode = overlap_decode
        """None: overlap when a decoder is set and a single-rank executor runs on CUDA; True/False: force."""
        self.early_first_frame = early_first_frame
        self.seed = 0
        self._ready = False
        self.producer: threading.Thread | None = None
        """The DiT thread of the current (or last) overlapped stream; never alive once its iterator ends."""
        self._stop = threading.Event()
        self._streams: dict[str, torch.cuda.Stream] = {}
        self._switch_lock = threading.Lock()
        self._switches: list[PromptSwitch] = []
        self._cached: deque[_Cached] = deque()
        self._version = 0

    def chunk_size(self, index: int) -> int:
        """Latent frames of chunk `index` (also past any end, for unbounded streams)."""
        if self.chunk_sizes is not None and index < len(self.chunk_sizes):
            return self.chunk_sizes[index]
        return self.sampler.chunk_size(index)

    def is_last(self, index: int) -> bool:
        """Whether chunk `index` ends the stream (never for an unbounded one)."""
        return self._is_last(index)

    def _is_last(self, index: int) -> bool:
        return self.chunk_sizes is not None and index == len(self.chunk_sizes) - 1

    def set_prompt(
        self, prompt_embeds: torch.Tensor, mode: str = "swap", at_chunk: int | None = None
    ) -> None:
        """Change the prompt of the running (or next) stream before chunk `at_chunk` (None: the next chunk
        the DiT starts). Thread-safe: may be called while another thread iterates. prompt_embeds:
        [L, text_dim] / [1, L, text_dim]; mode: "swap" | "recache" | "cut" (module docstring)."""
        check_prompt_mode(mode)
        prompt = check_prompt_embeds(self.executor.cfg, prompt_embeds).float()
        with self._switch_lock:
            self._switches.append(PromptSwitch(prompt, mode, at_chunk))

    def _take_switch(self, index: int) -> PromptSwitch | None:
        """The switches due before chunk `index`, merged: the last prompt, in the mode that reaches furthest
        (cut, else recache, else swap)."""
        with self._switch_lock:
            due = [s for s in self._switches if s.at_chunk is None or s.at_chunk <= index]
            if not due:
                return None
            self._switches = [s for s in self._switches if all(s is not d for d in due)]
        modes = {s.mode for s in due}
        mode = next(m for m in ("cut", "recache", "swap") if m in modes)
        return PromptSwitch(due[-1].prompt_embeds, mode, index)

    @property
    def world_size(self) -> int:
        """Ranks that run this session's forwards in lock-step."""
        return self.executor.world_size

    @property
    def overlapped(self) -> bool:
        """Whether iterating runs the DiT in a producer thread, concurrently with the decoder."""
        if self.decoder is None:
            return False
        if self.overlap_decode is None:
            # multi-rank overlap issues NCCL collectives from the producer thread on every rank; it is
            # not yet validated on GPUs (see bench/RESULTS.md), so the default keeps it to one rank
            return self.world_size == 1 and torch.device(self.executor.device).type == "cuda"
        return bool(self.overlap_decode)

    def reset(self, prompt_embeds: torch.Tensor | None = None, seed: int | None = None) -> None:
        """Start a new stream; a new prompt recomputes the cross-attention K/V. Without a prompt the
        previous stream's is kept (the first stream gets runtime/prompts.py's default embedding).
        Queued prompt changes of the previous stream are dropped."""
        self._stop_producer()
        self.executor.use_slot(self.slot)
        if prompt_embeds is None and not self.executor.has_prompt:
            from ropesp.runtime.prompts import default_prompt_embeds

            prompt_embeds = default_prompt_embeds(self.executor.cfg)
        if prompt_embeds is not None:
            self.executor.set_prompt(prompt_embeds)
        with self._switch_lock:
            self._switches = []
        self._cached.clear()
        self._version = 0
        if seed is not None:
            self.seed = int(seed)
        self.executor.reset()
        if self.decoder is not None:
            self.decoder.reset()
        # only the first chunk's starting noise is drawn before its first forward (here, while the
        # device computes the prompt's K/V); its re-noising draws follow while that forward runs
        self._noise = NoiseStream(self.seed)
        self._first_x = self._draw(self.chunk_size(0), 1)[0]
        self._ready = True

    def _draw(self, frames: int, count: int) -> list[torch.Tensor]:
        """The stream's next `count` noise draws [B, frames, C, h, w] on the device, without a host
        sync (the stream's generator, in the documented order)."""
        shape = (
            self.batch,
            frames,
            self.executor.cfg.in_dim,
            self.geometry.latent_height,
            self.geometry.latent_width,
        )
        device = torch.device(self.executor.device)
        return [self._noise.draw(shape, device) for _ in range(count)]

    def __iter__(self) -> Iterator[Chunk]:
        if not self._ready:
            raise RuntimeError("call reset(prompt_embeds, seed) before iterating a session")
        self._ready = False
        return self._iter_overlapped() if self.overlapped else self._iter_serial()

    def generate(self) -> torch.Tensor:
        """Run the whole stream; returns latents [B, F, C, h, w] float32."""
        if self.chunk_sizes is None:
            raise ConfigError("generate() needs a bounded stream; iterate an unbounded one and stop it")
        return torch.cat([chunk.latents for chunk in self], dim=1)

    # --- the DiT loop ------------------------------------------------------------------------
    def dit_chunks(self) -> Iterator[DitChunk]:
        """The stream's chunks as the DiT finishes them, undecoded: the engine core steps a stream with
        next() on this and decodes on rank 0 itself (runtime/engine_core.py). Call reset() first."""
        if not self._ready:
            raise RuntimeError("call reset(prompt_embeds, seed) before iterating a session")
        self._ready = False
        return self._dit_chunks()

    def decode(self, latents: torch.Tensor) -> torch.Tensor | None:
        """One chunk's frames [B, N, H, W, 3] uint8 through this session's decoder (None without one)."""
        return self._decode(-1, latents)

    def _dit_chunks(self, stop: threading.Event | None = None) -> Iterator[DitChunk]:
        """Each chunk, in order, as the DiT finishes it; checks `stop` before each forward."""
        x_next, self._first_x = self._first_x, None
        steps, sigmas = self.schedule.timesteps, self.schedule.step_sigmas

        def forward(x, t, start):
            if stop is not None and stop.is_set():
                raise _Stopped
            self.executor.use_slot(self.slot)
            return self.executor.forward(x, t, start)

        start, index = 0, 0
        while True:
            n = self.chunk_size(index)
            t0 = time.perf_counter()
            info = self._switch_before(index, start, n, forward)
            if info["switch"] == "cut":
                start = 0
            with torch.profiler.record_function(f"ropesp.dit.chunk{index}"):
                x = x0 = x_next
                for i in range(len(steps)):
                    flow = forward(x, steps[i], start)
                    if i == 0:
                        # host work while the device runs the first forward: this chunk's re-noising
                        # draws, then the next chunk's starting noise (the documented order: x, then
                        # one eps per later step, chunk after chunk)
                        eps = self._draw(n, len(steps) - 1)
                        if not self._is_last(index):
                            x_next = self._draw(self.chunk_size(index + 1), 1)[0]
                    x0 = self.schedule.to_x0(x, flow, sigmas[i])
                    if i + 1 < len(steps):
                        x = self.schedule.add_noise(x0, eps[i], sigmas[i + 1])
                latents, copied = to_host(x0)
            last = self._is_last(index)
            refresh = not (last and self.skip_final_refresh)
            self._remember(start, n, x0)

            def clean_context_pass(index=index, x0=x0, start=start):
                with torch.profiler.record_function(f"ropesp.dit.context{index}"):
                    # overwrites this chunk's cache slots for the next chunk; the output is not used
                    forward(x0, torch.tensor(self.schedule.context_t), start)

            # The chunk is final here and goes out before its clean-context pass, which only prepares the
            # cache for the next chunk (time to first chunk = its denoising forwards). An executor that
            # replays CUDA graphs keeps the host ahead of the device: there the pass is queued before the
            # host waits for the latents, so the device goes on instead of idling until the host has
            # handed the chunk out and come back (~1 ms per chunk on an H200, bench/RESULTS.md); without
            # graphs the device waits for the host, and queuing the pass first would delay the chunk. The
            # rule follows the configuration, never timing, so every rank of a group queues the same
            # collectives before a chunk boundary (a cancel there stops them all at the same point).
            ahead = refresh and self.executor.cuda_graphs
            if ahead:
                clean_context_pass()
            if copied is not None:
                copied.synchronize()
            info["dit_ms"] = (time.perf_counter() - t0) * 1e3
            yield DitChunk(index, start, latents, info)
            if refresh and not ahead:
                clean_context_pass()
            if last:
                return
            start += n
            index += 1

    def _switch_before(self, index: int, start: int, frames: int, forward) -> dict:
        """Apply the prompt change due before chunk `index` (at `start`, of `frames` frames), if any."""
        switch = self._take_switch(index)
        if switch is None:
            return {"switch": None, "switch_ms": 0.0, "prompt_version": self._version}
        t0 = time.perf_counter()
        with torch.profiler.record_function(f"ropesp.switch{index}.{switch.mode}"):
            self.executor.use_slot(self.slot)
            self.executor.set_prompt(switch.prompt_embeds)
            if switch.mode == "cut":
                self.executor.reset()
                self._cached.clear()
            elif switch.mode == "recache" and self._cached:
                replay = self._replay_set(start + frames)
                self.executor.reset()
                for c in replay:
                    forward(c.x0, torch.tensor(self.schedule.context_t), c.start)
        self._version += 1
        ms = (time.perf_counter() - t0) * 1e3
        return {"switch": switch.mode, "switch_ms": ms, "prompt_version": self._version}

    def _replay_set(self, next_end: int) -> list[_Cached]:
        """The cached chunks a re-cache recomputes before the chunk that ends at frame next_end: all of
        them with global attention; with a rolling window those holding sink frames and those the
        chunk's window (its newest local_attn_frames - sink_frames frames) reaches."""
        cache = self.cache_cfg
        if cache is None:
            raise ConfigError(f"{arg('mode', 'recache')} needs an executor with a KV cache geometry")
        if not cache.rolling:
            return list(self._cached)
        cutoff = next_end - (cache.local_attn_frames - cache.sink_frames)
        return [c for c in self._cached if c.start < cache.sink_frames or c.start + c.frames > cutoff]

    def _remember(self, start: int, frames: int, x0: torch.Tensor) -> None:
        """Keep x0 of the chunks a later re-cache may replay (bounded by the window or the cache)."""
        self._cached.append(_Cached(start, frames, x0))
        cache = self.cache_cfg
        if cache is not None and cache.rolling:
            # a later chunk's window starts after end - (window - sink): older non-sink chunks are out
            oldest = start + frames - (cache.local_attn_frames - cache.sink_frames)
            keep = [c for c in self._cached if c.start < cache.sink_frames or c.start + c.frames > oldest]
            self._cached = deque(keep)

    def _decode(self, index: int, latents: torch.Tensor) -> torch.Tensor | None:
        if self.decoder is None:
            return None
        with torch.profiler.record_function(f"ropesp.decode.chunk{index}"):
            return self.decoder.decode(latents)

    def _chunks(self, t0: float, item: DitChunk) -> Iterator[Chunk]:
        """Decode one chunk of the DiT loop into its Chunks (elapsed since the stream's start t0), piece
        by piece (`decode_pieces`)."""
        for piece in decode_pieces(item, self.early_first_frame and self.decoder is not None):
            d0 = time.perf_counter()
            frames = self._decode(piece.index, piece.latents)
            now = time.perf_counter()
            decode_ms = (now - d0) * 1e3 if self.decoder is not None else 0.0
            yield finished_chunk(piece, frames, (now - t0) * 1e3, decode_ms)

    def _iter_serial(self) -> Iterator[Chunk]:
        t0 = time.perf_counter()
        for item in self._dit_chunks():
            yield from self._chunks(t0, item)

    # --- overlapped: DiT producer thread + decoding consumer ------------------------------------
    def _stream(self, name: str, device: torch.device) -> torch.cuda.Stream | None:
        """A side CUDA stream per role (created once), or None off CUDA."""
        if device.type != "cuda":
            return None
        key = f"{name}:{device}"
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device=device)
        return self._streams[key]

    def _decoder_device(self) -> torch.device:
        device = getattr(self.decoder, "device", None)  # StreamDecoder.device; None: the host
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda": the current GPU, one stream per GPU
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _iter_overlapped(self) -> Iterator[Chunk]:
        device = torch.device(self.executor.device)
        dit_stream = self._stream("dit", device)
        decode_stream = self._stream("decode", self._decoder_device())
        # a bounded stream's producer never blocks; an unbounded one waits MAX_AHEAD_UNBOUNDED chunks ahead
        handoff: queue.Queue = queue.Queue(0 if self.chunk_sizes is not None else MAX_AHEAD_UNBOUNDED)
        stop = self._stop = threading.Event()

        def put(item) -> None:
            while True:
                try:
                    return handoff.put(item, timeout=0.05)
                except queue.Full:
                    if stop.is_set():
                        raise _Stopped from None

        grad = torch.is_grad_enabled()
        for side in (dit_stream, decode_stream):  # prompt K/V, cache and decoder resets ran on the caller's
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(side.device))

        def produce() -> None:
            try:
                torch.set_grad_enabled(grad)
                if dit_stream is not None:
                    torch.cuda.set_device(device)  # the current device is per thread
                with torch.cuda.stream(dit_stream) if dit_stream is not None else contextlib.nullcontext():
                    for item in self._dit_chunks(stop):
                        put(item)
                put(_DONE)
            except _Stopped:  # the consumer is gone or going: it reads nothing more
                with contextlib.suppress(queue.Full):
                    handoff.put_nowait(_DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                with contextlib.suppress(_Stopped):
                    put(exc)

        t0 = time.perf_counter()
        thread = self.producer = threading.Thread(target=produce, name="ropesp-dit", daemon=True)
        thread.start()
        try:
            while True:
                item = handoff.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                pieces = self._chunks(t0, item)
                while True:
                    # the decode stream is entered per piece: a `with` around a yield would leave it
                    # current in the consumer's code between pieces
                    with (
                        torch.cuda.stream(decode_stream)
                        if decode_stream is not None
                        else contextlib.nullcontext()
                    ):
                        chunk = next(pieces, None)
                    if chunk is None:
                        break
                    yield chunk
        finally:
            self._stop_producer()

    def _stop_producer(self) -> None:
        """Ask a running producer to stop before its next forward, wait for it, and order its stream."""
        thread = self.producer
        if thread is None:
            return
        self._stop.set()
        thread.join()
        device = torch.device(self.executor.device)
        dit_stream = self._streams.get(f"dit:{device}")
        if dit_stream is not None:  # later work on the caller's stream comes after the producer's
            torch.cuda.current_stream(device).wait_stream(dit_stream)
