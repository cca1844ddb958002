"""Streaming session: executor + sampler + decoder, yielding each chunk as soon as it is done.

A session owns one stream at a time; `reset(prompt_embeds, seed)` starts a new one without
reallocating caches. Iterating yields `Chunk`s in order.

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
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ropesp.config import SamplerConfig, VideoGeometry
from ropesp.decode.base import StreamDecoder, to_host
from ropesp.runtime.executor import Executor
from ropesp.runtime.sampler import FlowSchedule, NoiseStream


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
        latent_frames: int,
        decoder: StreamDecoder | None = None,
        batch: int = 1,
        skip_final_refresh: bool = True,
        overlap_decode: bool | None = None,
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
        self.overlap_decode = overlap_decode
        """None: overlap when a decoder is set and a single-rank executor runs on CUDA; True/False: force."""
        self.seed = 0
        self._ready = False
        self.producer: threading.Thread | None = None
        """The DiT thread of the current (or last) overlapped stream; never alive once its iterator ends."""
        self._stop = threading.Event()
        self._streams: dict[str, torch.cuda.Stream] = {}

    @property
    def world_size(self) -> int:
        """Ranks that run this session's forwards in lock-step (1 for an executor without SP state)."""
        state = getattr(self.executor, "state", None)
        return 1 if state is None else state.mapping.world_size

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
        """Start a new stream; a new prompt recomputes the cross-attention K/V."""
        self._stop_producer()
        if prompt_embeds is not None:
            self.executor.set_prompt(prompt_embeds)
        if seed is not None:
            self.seed = int(seed)
        self.executor.reset()
        if self.decoder is not None:
            self.decoder.reset()
        # only the first chunk's starting noise is drawn before its first forward (here, while the
        # device computes the prompt's K/V); its re-noising draws follow while that forward runs
        self._noise = NoiseStream(self.seed)
        self._first_x = self._draw(self.chunk_sizes[0], 1)[0]
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
        return torch.cat([chunk.latents for chunk in self], dim=1)

    # --- the DiT loop ------------------------------------------------------------------------
    def _dit_chunks(self, stop: threading.Event | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(index, start_frame, latents on the CPU) of each chunk, in order; checks `stop` before each forward."""
        x_next, self._first_x = self._first_x, None
        steps, sigmas = self.schedule.timesteps, self.schedule.step_sigmas

        def forward(x, t, start):
            if stop is not None and stop.is_set():
                raise _Stopped
            return self.executor.forward(x, t, start)

        start = 0
        for index, n in enumerate(self.chunk_sizes):
            with torch.profiler.record_function(f"ropesp.dit.chunk{index}"):
                x = x0 = x_next
                for i in range(len(steps)):
                    flow = forward(x, steps[i], start)
                    if i == 0:
                        # host work while the device runs the first forward: this chunk's re-noising
                        # draws, then the next chunk's starting noise (the documented order: x, then
                        # one eps per later step, chunk after chunk)
                        eps = self._draw(n, len(steps) - 1)
                        if index + 1 < len(self.chunk_sizes):
                            x_next = self._draw(self.chunk_sizes[index + 1], 1)[0]
                    x0 = self.schedule.to_x0(x, flow, sigmas[i])
                    if i + 1 < len(steps):
                        x = self.schedule.add_noise(x0, eps[i], sigmas[i + 1])
                latents, copied = to_host(x0)
            last = index == len(self.chunk_sizes) - 1
            refresh = not (last and self.skip_final_refresh)

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
            ahead = refresh and bool(getattr(self.executor, "cuda_graphs", False))
            if ahead:
                clean_context_pass()
            if copied is not None:
                copied.synchronize()
            yield index, start, latents
            if refresh and not ahead:
                clean_context_pass()
            start += n

    def _decode(self, index: int, latents: torch.Tensor) -> torch.Tensor | None:
        if self.decoder is None:
            return None
        with torch.profiler.record_function(f"ropesp.decode.chunk{index}"):
            return self.decoder.decode(latents)

    def _iter_serial(self) -> Iterator[Chunk]:
        t0 = time.perf_counter()
        for index, start, latents in self._dit_chunks():
            frames = self._decode(index, latents)
            yield Chunk(index, start, latents, frames, (time.perf_counter() - t0) * 1e3)

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
        handoff: queue.SimpleQueue = queue.SimpleQueue()  # unbounded: the producer never blocks
        stop = self._stop = threading.Event()
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
                        handoff.put(item)
                handoff.put(_DONE)
            except _Stopped:
                handoff.put(_DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                handoff.put(exc)

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
                index, start, latents = item
                if decode_stream is not None:
                    with torch.cuda.stream(decode_stream):
                        frames = self._decode(index, latents)
                else:
                    frames = self._decode(index, latents)
                yield Chunk(index, start, latents, frames, (time.perf_counter() - t0) * 1e3)
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
