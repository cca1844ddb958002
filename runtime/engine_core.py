"""The engine core: one rank group, one model (or its engines) and the streams it serves.

Every front end drives it the same way (`ropesp generate`, `ropesp.Pipeline`, the Triton model, the
demo's WebSocket server):

    core = EngineCore(resolve(config)).start()        # ranks started, executors and decoder built
    stream = core.open(core.request(prompt, seed=0, latent_frames=9))   # AtCapacity when full
    for chunk in stream: ...                          # Chunk: latents, frames, timings, prompt_version
    stream.set_prompt(other, "recache")               # any thread: from the next chunk the DiT starts
    stream.cancel()                                   # any thread: ends after the current chunk
    core.close()

Inside, one engine thread on rank 0 runs the loop: it takes the front ends' operations (new streams,
prompt changes, cancels), picks the next stream to step (`scheduler.pick`: a new stream's first chunk
first, then the stream closest to its real-time deadline, else round robin), tells every rank the
tick (runtime/ranks.py), and every rank applies it to its `RankEngine`: each stream is a StreamSession
on its own KV cache slot of one executor, stepped one chunk (its denoising forwards and clean-context
pass) per tick. Rank 0 decodes the chunk, inline or on a decode thread (overlapped with the next DiT
chunk; the default on CUDA), and hands it to the stream's queue.

A stream is stepped only as far as its consumer asks, plus `ahead` chunks (0 when decode is inline,
so a prompt change after chunk k applies to chunk k+1; 2 for an overlapped stream that is unbounded or
live, i.e. may be steered while it runs; the whole video for a bounded one nobody steers, e.g.
`generate`'s): a slow consumer holds bounded memory and never stalls the others.

Admission: `open` refuses a stream when every KV cache slot is taken, or, with `realtime_fps`, when
the measured chunk time says one more stream would bring the running ones below real time.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import copy
import itertools
import queue
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ropesp.config import VAE_STRIDE
from ropesp.errors import ConfigError, EngineError, RopespError, arg
from ropesp.runtime.dist import Mapping
from ropesp.runtime.executor import check_prompt_embeds
from ropesp.runtime.pipeline import (
    ResolvedPipeline,
    cache_too_small,
    resolve_rank,
    stream_decoder,
)
from ropesp.runtime.rank_engine import OpenOp, RankEngine, Tick, follow
from ropesp.runtime.ranks import Command, RankFailure, RankGroup
from ropesp.runtime.scheduler import Scheduled, pick
from ropesp.runtime.session import (
    Chunk,
    DitChunk,
    check_prompt_mode,
    check_unbounded,
    decode_pieces,
    finished_chunk,
)
from ropesp.settings import RunConfig, check_seed

MAX_AHEAD = 2
"""Chunks an overlapped unbounded stream's DiT may finish before its consumer asks for them."""
CAPACITY_HEADROOM = 0.9
"""Admission keeps this share of the real-time budget: chunk times vary, and a stream admitted at the
edge would miss its deadlines."""
STEP_SAMPLES = 16
"""Steady chunk steps whose median admission reads."""


class AtCapacity(RopespError):
    """The engine cannot take another stream now (every slot taken, or real time would be lost)."""


@dataclass(frozen=True, eq=False)
class StreamRequest:
    """One validated stream, as every rank runs it."""

    prompt: torch.Tensor
    """[1, L, text_dim] float32 on the CPU."""
    seed: int
    latent_frames: int | None
    """None: until cancelled (needs the rolling window)."""
    changes: tuple[tuple[int, torch.Tensor], ...] = ()
    """(chunk k >= 1, embeddings [1, L, text_dim]): the prompt from chunk k on (a prompt schedule)."""
    change_mode: str = "swap"
    """How the scheduled changes treat the self-attention cache."""
    decode: bool = True
    """Decode this stream's chunks on rank 0 (False: latents only)."""
    live: bool = False
    """Prompt changes may come while it runs (Pipeline.stream, a steerable Triton stream): its DiT stays
    at most MAX_AHEAD chunks ahead of its consumer even when bounded, so a change lands within them."""


# --- rank 0 -------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Stream:
    """Rank 0's record of a stream."""

    id: int
    slot: int
    request: StreamRequest
    opened: float
    """perf_counter() at open."""
    decoder: object | None
    chunks: int | None
    """Chunks of a bounded stream (None: until cancelled)."""
    out: queue.Queue = field(default_factory=queue.Queue)
    requested: int = 0
    """Chunks the consumer has asked for."""
    produced: int = 0
    """Chunks the DiT has finished."""
    ahead: int = 0
    video_frames: int = 0
    """Video frames of the chunks produced (for the real-time deadline)."""
    last_step: float = 0.0
    finished: bool = False
    """The engine is done with it (last chunk, cancel, or failure): its slot is free."""
    cancelled: bool = False
    prompts: list[tuple[torch.Tensor, str]] = field(default_factory=list)


WARM_CHUNKS = 4
"""Chunks per slot of a GPU warm-up: a rolling window's cache plans (and so the CUDA graphs) repeat from
the fourth chunk on."""

_END = object()


class EngineStream:
    """A running stream, for its front end: iterate it for Chunks; set_prompt / cancel from any thread."""

    def __init__(self, core: EngineCore, record: _Stream) -> None:
        self._core, self._record = core, record
        self._ended = False

    @property
    def id(self) -> int:
        return self._record.id

    @property
    def request(self) -> StreamRequest:
        return self._record.request

    @property
    def finished(self) -> bool:
        """The stream has ended (its last chunk made, cancelled, or failed)."""
        return self._record.finished

    def __iter__(self) -> EngineStream:
        return self

    def __next__(self) -> Chunk:
        if self._ended:
            raise StopIteration
        self._core._demand(self._record)
        item = self._record.out.get()
        if item is _END:
            self._ended = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def set_prompt(self, prompt: torch.Tensor, mode: str = "swap") -> bool:
        """Change the prompt from the next chunk the DiT starts (checked embeddings [1, L, text_dim]);
        False when the stream has already ended (nothing is queued)."""
        return self._core._set_prompt(self._record, prompt, check_prompt_mode(mode))

    def cancel(self) -> None:
        """End the stream after the chunk the DiT is on; chunks not yet taken are dropped."""
        self._core._cancel(self._record)

    def close(self) -> None:
        self.cancel()
        self._ended = True

    def __enter__(self) -> EngineStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EngineCore:
    """Rank 0 of an engine (world size 1 runs the same code with no other ranks); see the module
    docstring. Thread-safe: any thread may open streams and steer them."""

    def __init__(
        self,
        res: ResolvedPipeline,
        mapping: Mapping | None = None,
        *,
        python: str = sys.executable,
        python_path: Sequence[str] = (),
        decoder: object | None = None,
    ) -> None:
        """mapping: this process's rank under torchrun (None: rank 0, spawning the others); python /
        python_path: the interpreter of spawned ranks; decoder: rank 0's decoder instead of the
        one the settings name (tests)."""
        self.res = res
        self.mapping = mapping or Mapping(res.world_size, 0, 0)
        self._python, self._python_path = python, list(python_path)
        self._decoder_given = decoder
        self.group: RankGroup | None = None
        self.rank_engine: RankEngine | None = None
        self.decoder = None
        self._slot_decoders: dict[int, object] = {}
        self._cv = threading.Condition()
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._tick = Tick()
        self._open_tensors: list[torch.Tensor] = []
        """The pending opens' prompts and scheduled changes, in the opens' order."""
        self._prompt_tensors: list[torch.Tensor] = []
        """The pending prompt changes' embeddings, in their order (a tick carries the opens' first)."""
        self._failure: str | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._decode_thread: threading.Thread | None = None
        self._decode_queue: queue.Queue = queue.Queue()
        self._steps: collections.deque[float] = collections.deque(maxlen=STEP_SAMPLES)
        self.step_ms: float | None = None
        """Median milliseconds of the recent steady chunk steps (DiT, and decode when inline; a stream's
        first chunk and steps that compile or capture CUDA graphs left out): what admission reads."""

    # --- life -----------------------------------------------------------------------------------------
    def start(self) -> EngineCore | None:
        """Start the ranks, build every rank's engine and rank 0's decoder, start the engine thread.
        On a follower rank (under torchrun) follow the leader until it shuts down, then return None."""
        res = self.res
        group = RankGroup(
            res.world_size,
            res.device,
            mapping=None if self.mapping.rank == 0 and not _under_torchrun(self.mapping) else self.mapping,
            python=self._python,
            python_path=self._python_path,
        )
        self.group = group.start()
        if not group.is_leader:
            follow(group)
            group.close(graceful=False)
            return None
        try:
            group.send(Command("build", res.config.to_dict()))
            self.rank_engine = RankEngine(res, group.mapping)
            group.bound_sends(res.collective_timeout_s)
            if self._decoder_given is not None:
                self.decoder = self._decoder_given
            else:
                self.decoder = stream_decoder(res, group.device)
        except BaseException as exc:
            reason = group.failure(exc) if res.world_size > 1 and not isinstance(exc, RopespError) else None
            self.rank_engine = None
            group.close(graceful=False)
            if reason is not None:
                raise RankFailure(f"the engine could not start: {reason}") from exc
            raise
        self._failure = None
        # the threads run in the starter's context: what they report names settings as its caller does
        # (collective_timeout=5 from Python, --collective-timeout 5 from the command line)
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.copy().run, args=(self._loop,), name="ropesp-engine", daemon=True
        )
        self._thread.start()
        if self.overlapped:
            self._decode_thread = threading.Thread(
                target=context.copy().run, args=(self._decode_loop,), name="ropesp-decode", daemon=True
            )
            self._decode_thread.start()
        # a caller whose exception escapes never closes: the loop must stop (its collectives ended)
        # before the interpreter tears down, which would otherwise abort the process mid-collective
        atexit.register(self.close)
        return self

    @property
    def overlapped(self) -> bool:
        """Whether rank 0 decodes on its own thread, concurrently with the next DiT chunk."""
        decode = self.res.config.decode
        if decode.overlap_decode is not None:
            return decode.overlap_decode and self.decoder is not None
        # on CUDA, or with a decoder on a device of its own: decoding then takes nothing from the DiT
        on_gpu = torch.device(self.res.device).type == "cuda"
        return self.decoder is not None and (on_gpu or bool(decode.decode_device))

    @property
    def world_size(self) -> int:
        return self.res.world_size

    @property
    def workers(self) -> list:
        """The spawned ranks' processes (empty at world size 1 or under torchrun)."""
        return list(self.group.workers) if self.group is not None else []

    def healthy(self) -> bool:
        return self._failure is None and self.group is not None and self.group.healthy()

    def close(self) -> None:
        """End every stream and stop every rank; idempotent."""
        atexit.unregister(self.close)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop_decode_thread()
        group, self.group = self.group, None
        self.rank_engine = None  # its CUDA graphs captured NCCL calls: gone before the group
        self._slot_decoders.clear()
        if group is not None:
            group.close(graceful=self._failure is None)
        with self._cv:
            for record in self._streams.values():
                self._end(record, None)
            self._streams.clear()

    def __enter__(self) -> EngineCore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def recover(self) -> None:
        """Replace a failed rank group (its ranks are out of step for good): stop every rank, start them
        again, so the next stream is served. RankFailure if that fails."""
        reason = self._failure or "the engine was closed"
        print(f"ropesp: restarting the rank group ({reason})", file=sys.stderr, flush=True)
        self.close()
        self._closing = False
        try:
            self.start()
        except RopespError as exc:
            self._failure = f"restart failed: {exc}"
            raise RankFailure(f"the rank group failed ({reason}) and could not be restarted: {exc}") from exc

    # --- requests -------------------------------------------------------------------------------------
    def check_prompt(self, prompt: torch.Tensor, name: str = "prompt_embeds") -> torch.Tensor:
        """A stream's prompt embeddings, checked -> float32 [1, L, text_dim] on the CPU."""
        cfg = self.res.model
        if not isinstance(prompt, torch.Tensor):
            raise ConfigError(f"{arg(name)} must be an embeddings tensor [L, {cfg.text_dim}]")
        if prompt.device.type == "meta":
            raise ConfigError(f"{arg(name)} is on the meta device (it holds no values)")
        if prompt.is_floating_point():
            prompt = prompt.detach().to("cpu", torch.float32)
        prompt = check_prompt_embeds(cfg, prompt)
        if prompt.shape[0] != 1:
            raise ConfigError(
                f"{arg(name)} must be one stream's embeddings [L, {cfg.text_dim}], got {tuple(prompt.shape)}"
            )
        return prompt.contiguous()

    def request(
        self,
        prompt: torch.Tensor,
        seed: int = 0,
        latent_frames: int | None = None,
        *,
        changes: Sequence[tuple[int, torch.Tensor]] = (),
        change_mode: str = "swap",
        height: int | None = None,
        width: int | None = None,
        decode: bool = True,
        live: bool = False,
    ) -> StreamRequest:
        """Validate a stream -> StreamRequest (ConfigError naming the parameter otherwise).
        latent_frames None: until cancelled (needs the rolling window); height/width (pixels) are
        optional: the engine serves the size it was built for; live: prompt changes may come while it
        runs (StreamRequest.live)."""
        seed = check_seed(seed)
        res = self.res
        if latent_frames is None:
            check_unbounded(res.cache)
        else:
            if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
                raise ConfigError(f"{arg('latent_frames', latent_frames)} must be an integer >= 1")
            res.config.sampler.chunk_sizes(latent_frames)
            if not res.cache.rolling and latent_frames > res.cache.max_frames:
                raise ConfigError(cache_too_small(latent_frames, res.cache.max_frames))
        g = res.geometry
        served = (g.latent_height * VAE_STRIDE[1], g.latent_width * VAE_STRIDE[2])
        if (height, width) not in ((None, None), served):
            raise ConfigError(
                f"{arg('height')} x {arg('width')} {height} x {width}: this engine serves {served[0]} x {served[1]} "
                "pixels (its KV cache and engines are built for that size)"
            )
        chunks = None if latent_frames is None else len(res.config.sampler.chunk_sizes(latent_frames))
        checked = []
        for k, embeds in changes:
            if chunks is not None and k >= chunks:
                raise ConfigError(
                    f"a prompt change at chunk {k}: the video has {chunks} chunks (0..{chunks - 1})"
                )
            checked.append((k, self.check_prompt(embeds)))
        return StreamRequest(
            self.check_prompt(prompt),
            seed,
            latent_frames,
            tuple(checked),
            check_prompt_mode(change_mode),
            decode,
            live,
        )

    def open(self, request: StreamRequest) -> EngineStream:
        """Admit a stream (AtCapacity otherwise); its chunks come as its consumer iterates it. A rank that
        died while the engine idled is found here, and the ranks are started again first."""
        if self._failure is None and self.group is not None and not self.group.healthy():
            self._failure = self.group.failure()
        if self._failure is not None or self.group is None:
            self.recover()
        with self._cv:
            if self._closing:
                raise EngineError("the engine is closed")
            running = [r for r in self._streams.values() if not r.finished]
            self._admit(len(running))
            slot = min(set(range(self.res.max_streams)) - {r.slot for r in running})
            decoder = self._stream_decoder(slot) if request.decode else None
            bounded_alone = request.latent_frames is not None and not request.live
            ahead = (1 << 30 if bounded_alone else MAX_AHEAD) if self.overlapped else 0
            chunks = (
                None if request.latent_frames is None else len(self.res.chunk_sizes(request.latent_frames))
            )
            record = _Stream(
                next(self._ids), slot, request, time.perf_counter(), decoder, chunks, ahead=ahead
            )
            self._streams[record.id] = record
            op = OpenOp(
                record.id,
                slot,
                request.seed,
                request.latent_frames,
                [k for k, _ in request.changes],
                request.change_mode,
            )
            self._tick.opens.append(op)
            self._open_tensors += [request.prompt, *(e for _, e in request.changes)]
            self._cv.notify_all()
        return EngineStream(self, record)

    def warm_up(
        self,
        prompt: torch.Tensor,
        latent_frames: int | None,
        streams: int | None = None,
        chunks: int | None = None,
    ) -> float:
        """Run throwaway streams so that the first viewers start warm; returns its ms.

        Default: on a GPU one stream per KV cache slot at once, WARM_CHUNKS chunks each (every slot's CUDA
        graphs captured; a new viewer on a cold slot would wait for its captures), elsewhere one stream's
        first chunk. prompt: checked embeddings [1, L, text_dim]; latent_frames as in `request` (None:
        unbounded, the rolling window's plans). The streams are closed before it returns."""
        t0 = time.perf_counter()
        if streams is None:
            streams = self.res.max_streams if self.res.device == "cuda" else 1
        if chunks is None:
            chunks = WARM_CHUNKS if streams > 1 else 1
        decode = self.decoder is not None
        opened = [
            self.open(self.request(prompt, seed, latent_frames, decode=decode, live=True))
            for seed in range(streams)
        ]
        try:
            for _ in range(chunks):  # round robin: every stream holds its slot throughout
                for stream in opened:
                    next(stream, None)
        finally:
            for stream in opened:
                stream.close()
        return (time.perf_counter() - t0) * 1e3

    def _admit(self, running: int) -> None:
        """Raise AtCapacity when another stream cannot be served now."""
        slots = self.res.max_streams
        if running >= slots:
            raise AtCapacity(
                f"at capacity: {running} stream{'s' if running != 1 else ''} running, every KV cache slot taken "
                f"({arg('max_streams', slots)}); try again when one ends"
            )
        fps = self.res.config.streams.realtime_fps
        if fps <= 0 or running == 0 or self.step_ms is None:
            return
        frames = 4 * self.res.config.sampler.chunk_frames
        budget_ms = 1e3 * frames / fps * CAPACITY_HEADROOM
        if (running + 1) * self.step_ms > budget_ms:
            each = frames / ((running * self.step_ms) / 1e3) if running else 0.0
            raise AtCapacity(
                f"at capacity: {running} stream{'s' if running != 1 else ''} at {min(each, 999):.1f} FPS each "
                f"(a chunk takes {self.step_ms:.0f} ms); one more would bring them below "
                f"{arg('realtime_fps', fps)}"
            )

    def _stream_decoder(self, slot: int):
        """The decoder of a slot's streams: rank 0's decoder for slot 0, a fork of it (the same weights,
        its own carried state) for the others, made once. It is reset where the stream's first chunk is
        decoded (`_deliver`), not here: a cancelled stream's chunk still in flight on that slot is
        decoded first, in the same thread, and must not leave its state to the new stream."""
        if self.decoder is None:
            return None
        if slot not in self._slot_decoders:
            # a decoder's carried state is what reset() makes anew: a shallow copy shares the weights (and
            # compiled code) and gets its own state
            fork = getattr(self.decoder, "fork", None) or (lambda: copy.copy(self.decoder))
            self._slot_decoders[slot] = fork() if slot else self.decoder
        return self._slot_decoders[slot]

    # --- what front-end threads ask -------------------------------------------------------------------
    def _demand(self, record: _Stream) -> None:
        with self._cv:
            record.requested += 1
            self._cv.notify_all()

    def _set_prompt(self, record: _Stream, prompt: torch.Tensor, mode: str) -> bool:
        prompt = self.check_prompt(prompt)
        with self._cv:
            if record.finished or record.cancelled:
                return False
            self._tick.prompts.append((record.id, mode))
            self._prompt_tensors.append(prompt)
            self._cv.notify_all()
        return True

    def _cancel(self, record: _Stream) -> None:
        with self._cv:
            if record.finished or record.cancelled:
                return
            record.cancelled = True
            self._drain(record)
            if record.id not in [op.stream for op in self._tick.opens]:
                self._tick.closes.append(record.id)
            else:  # never started: drop the open with its prompt tensors
                self._drop_open(record.id)
            self._end(record, None)
            self._cv.notify_all()

    def _drop_open(self, stream: int) -> None:
        """Drop a pending open (cancelled before its first tick) with its tensors (called with the lock
        held; its prompt changes were refused: it had not started)."""
        kept_ops, kept, pending = [], [], list(self._open_tensors)
        for op in self._tick.opens:
            mine = pending[: 1 + len(op.change_chunks)]
            del pending[: 1 + len(op.change_chunks)]
            if op.stream != stream:
                kept_ops.append(op)
                kept += mine
        self._tick.opens, self._open_tensors = kept_ops, kept

    @staticmethod
    def _drain(record: _Stream) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                record.out.get_nowait()

    def _end(self, record: _Stream, error: BaseException | None) -> None:
        """The stream is over for its consumer (called with the lock held)."""
        if record.finished:
            return
        record.finished = True
        if error is not None:
            record.out.put(error)
        record.out.put(_END)

    # --- the engine thread ----------------------------------------------------------------------------
    def _runnable(self) -> list[Scheduled]:
        return [
            Scheduled(r.id, r.produced, r.video_frames, r.opened, r.last_step)
            for r in self._streams.values()
            if not r.finished and r.produced < r.requested + r.ahead
        ]

    def _next_tick(self) -> tuple[Tick, list[torch.Tensor]] | None:
        with self._cv:
            while True:
                if self._closing:
                    return None
                candidates = self._runnable()
                if self._tick or candidates:
                    break
                self._cv.wait()
            # the order every rank's RankEngine.apply pops them in: the opens', then the prompt changes'
            tick, tensors = self._tick, self._open_tensors + self._prompt_tensors
            self._tick, self._open_tensors, self._prompt_tensors = Tick(), [], []
            tick.step = pick(candidates, self.res.config.streams.realtime_fps, time.perf_counter())
            return tick, tensors

    def _loop(self) -> None:
        if torch.device(self.res.device).type == "cuda":
            torch.cuda.set_device(self.group.device)
        torch.set_grad_enabled(False)
        while True:
            work = self._next_tick()
            if work is None:
                return
            tick, tensors = work
            t0 = time.perf_counter()
            captured = self._captures()
            try:
                self.group.send(Command("tick", tick), tensors)
                item = self.rank_engine.apply(tick, tensors)
            except BaseException as exc:
                self._fail(exc)
                if self.res.world_size > 1:
                    return  # the ranks are out of step: the next open() restarts them
                continue
            with self._cv:
                for stream in tick.closes:
                    self._streams.pop(stream, None)
                record = self._streams.get(tick.step) if tick.step is not None else None
            if item is None or record is None:
                continue
            last = item.index + 1 == record.chunks
            with self._cv:
                record.produced += 1
                record.video_frames += 4 * item.latents.shape[1] - (3 if item.index == 0 else 0)
                record.last_step = time.perf_counter()
            if record.decoder is not None and self.overlapped:
                self._decode_queue.put((record, item, last))
            else:
                self._deliver(record, item, last)
            if item.index > 0 and self._captures() == captured:  # a steady step: no compile, no capture
                self._steps.append((time.perf_counter() - t0) * 1e3)
                self.step_ms = statistics.median(self._steps)

    def _captures(self) -> int:
        """CUDA graphs captured so far (a step that captures one, or compiles, says nothing of the steady
        chunk time admission reads)."""
        graphs = getattr(self.rank_engine.executor, "graphs", None)
        return len(graphs) if graphs is not None else 0

    def _deliver(self, record: _Stream, item: DitChunk, last: bool) -> None:
        """Decode (when the stream asks for frames) and hand the chunk to its consumer, in the pieces
        `decode_pieces` makes of it."""
        early = self.res.config.decode.early_first_frame and record.decoder is not None
        pieces = decode_pieces(item, early)
        for n, piece in enumerate(pieces):
            d0 = time.perf_counter()
            try:
                if n == 0 and not torch.isfinite(item.latents).all():  # on the host already: no sync
                    raise EngineError(
                        f"chunk {item.index}'s latents hold NaN or Inf values: the model's output diverged (a "
                        "checkpoint of another model, or weights in a dtype they overflow); the stream ends here"
                    )
                if record.finished:  # cancelled while this chunk was stepped: nobody takes its frames
                    return
                if n == 0 and record.decoder is not None and item.index == 0:
                    record.decoder.reset()
                frames = record.decoder.decode(piece.latents) if record.decoder is not None else None
            except BaseException as exc:
                with self._cv:
                    self._end(record, exc)
                    if record.id not in self._tick.closes and not last:
                        self._tick.closes.append(record.id)
                    self._cv.notify_all()
                return
            now = time.perf_counter()
            decode_ms = (now - d0) * 1e3 if record.decoder is not None else 0.0
            chunk = finished_chunk(piece, frames, (now - record.opened) * 1e3, decode_ms)
            with self._cv:
                if record.finished:
                    return
                record.out.put(chunk)
                if last and n + 1 == len(pieces):
                    self._end(record, None)
                    self._streams.pop(record.id, None)
                self._cv.notify_all()

    def _decode_loop(self) -> None:
        device = self._decoder_device()
        # a high-priority stream: a chunk's decode goes ahead of the next chunks' DiT kernels, so its
        # frames are not held behind them (the first frame a new viewer waits for)
        side = torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None
        if side is not None:
            torch.cuda.set_device(device)
        torch.set_grad_enabled(False)
        while True:
            work = self._decode_queue.get()
            if work is None:
                return
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                self._deliver(*work)

    def _decoder_device(self) -> torch.device:
        device = getattr(self.decoder, "device", None)
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _stop_decode_thread(self) -> None:
        if self._decode_thread is not None:
            self._decode_queue.put(None)
            self._decode_thread.join()
            self._decode_thread = None

    def _fail(self, exc: BaseException) -> None:
        """A tick failed: every running stream gets the reason (naming the rank where one failed)."""
        if self.res.world_size > 1:
            reason = self.group.failure(exc)
            error: BaseException = RankFailure(reason)
            self._failure = reason
        else:
            error = exc if isinstance(exc, RopespError) else EngineError(f"{type(exc).__name__}: {exc}")
        with self._cv:
            for record in self._streams.values():
                self._end(record, error)
            self._streams.clear()
            self._tick, self._open_tensors, self._prompt_tensors = Tick(), [], []
            self._cv.notify_all()
        if self.res.world_size == 1 and self.rank_engine is not None:
            for stream in list(self.rank_engine.sessions):
                self.rank_engine._drop(stream)

    # --- figures ----------------------------------------------------------------------------------------
    def running(self) -> int:
        """Streams running now."""
        with self._cv:
            return sum(not r.finished for r in self._streams.values())


def _under_torchrun(mapping: Mapping) -> bool:
    from ropesp.runtime.ranks import under_launcher

    return mapping.world_size > 1 and under_launcher()


def start_engine(config: RunConfig, **kwargs) -> EngineCore | None:
    """resolve + EngineCore(...).start(): the leader's ready engine, or None on a follower rank (torchrun)
    once the leader has shut down."""
    res, mapping = resolve_rank(config)
    return EngineCore(res, mapping, **kwargs).start()
