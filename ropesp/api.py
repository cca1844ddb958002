"""The Python API: `ropesp.Pipeline`, the engine core's Python face.

    import ropesp
    with ropesp.Pipeline(device="cpu") as pipe:          # the default model, preview frames
        stream = pipe.stream(prompt, seed=0, frames=33)
        for chunk in stream:                             # StreamChunk: frames [N, H, W, 3] uint8, timings
            stream.set_prompt(other)                     # from another thread too: at the next chunk
        video = pipe.generate(prompt, seed=1)            # Video: frames [N, H, W, 3], latents [1, F, C, h, w]
        video.save("out.mp4")

The pipeline is built once (model or engines, a KV cache slot per stream, CUDA graphs, decoder) and
serves request after request; with world_size > 1 its engine starts ranks 1..P-1 and owns them until
close(). Several streams may run at once (max_streams), each iterated from its own thread; a stream
beyond them is refused with AtCapacity. Errors are RopespError subclasses (ConfigError is also a
ValueError) whose messages name the Python arguments of this module.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ropesp.config import latent_frames_for
from ropesp.errors import ConfigError, arg, python_names
from ropesp.runtime.session import check_prompt_mode
from ropesp.settings import SECTIONS, RunConfig, check_seed

_DEFAULT = object()


@dataclass(frozen=True)
class StreamChunk:
    """One finished chunk of a stream (with early_first_frame=True the first chunk comes as two, both index
    0: its first video frame, then the rest)."""

    index: int
    """Chunk number, from 0."""
    start_frame: int
    """Latent frame of the chunk's first frame in the stream."""
    frames: np.ndarray | None
    """[N, H, W, 3] uint8 video frames (None for decoder="none")."""
    latents: torch.Tensor | None
    """[1, F_chunk, C, h, w] float32 on the CPU when the stream was asked for latents, else None."""
    timings: dict[str, float] = field(default_factory=dict)
    """Milliseconds: dit (this chunk's DiT work on the host clock), decode, elapsed (since the stream
    started), and switch (the prompt change that came into effect before this chunk, if any)."""
    prompt_version: int = 0
    """Prompt changes in effect (0: the stream's first prompt; k: the k-th set_prompt reached the DiT)."""


@dataclass(frozen=True)
class Video:
    """A whole generated video."""

    frames: np.ndarray | None
    """[N, H, W, 3] uint8 (None for decoder="none")."""
    latents: torch.Tensor
    """[1, F, C, h, w] float32."""
    chunks: tuple[StreamChunk, ...]
    """The chunks it came in (their timings; their latents and frames are the ones above)."""

    def save(self, output: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the frames as an MP4 (H.264, 16 FPS) at `output`; the file appears only when complete (a
        failed write leaves nothing). Refuses to replace an existing file unless overwrite=True."""
        from ropesp.video import StreamOutputs, check_outputs

        with python_names():
            if self.frames is None:
                raise ConfigError(
                    'this Video has no frames (decoder="none"): save its latents with torch.save'
                )
            paths = check_outputs(os.fspath(output), overwrite=overwrite)
            with StreamOutputs(paths) as out:
                out.write(self.frames)
                out.commit()
        return paths.video


class Stream:
    """One video: iterate it for StreamChunks (the work starts with the iteration); set_prompt and cancel
    from any thread."""

    def __init__(self, pipe: Pipeline, request, latents: bool, mode: str) -> None:
        self._pipe, self._request, self._latents, self._mode = pipe, request, latents, mode
        self._engine_stream = None
        self._iterating = False
        self._cancelled = False
        self._pending: list[tuple[torch.Tensor, str]] = []

    def set_prompt(self, prompt: str | torch.Tensor, mode: str | None = None) -> bool:
        """Change the prompt from the next chunk the DiT starts. Thread-safe. prompt: text or embeddings
        [L, text_dim] / [1, L, text_dim]; mode: "swap" (cross-attention K/V only), "recache" (also
        recompute the window's self-attention cache under the new prompt) or "cut" (a new scene: the cache
        cleared, the stream going on as a fresh one of the new prompt); default: the Pipeline's
        prompt_mode. Returns whether the change was queued: False once the stream has ended (its last
        chunk made, or cancelled), when no chunk is left to take it."""
        with python_names():
            mode = check_prompt_mode(mode or self._mode)
            embeds = self._pipe._core.check_prompt(self._pipe.encode(prompt), "prompt")
            stream = self._engine_stream
            if stream is None:  # not started: from its first chunk on
                if self._cancelled:
                    return False
                self._pending.append((embeds, mode))
                return True
            return stream.set_prompt(embeds, mode)

    def cancel(self) -> None:
        """End the stream after the current chunk. Thread-safe."""
        self._cancelled = True
        if self._engine_stream is not None:
            self._engine_stream.cancel()

    def close(self) -> None:
        """Cancel and free the stream's slot now."""
        self.cancel()

    def __iter__(self) -> Iterator[StreamChunk]:
        if self._iterating:
            raise RuntimeError("a Stream is iterated once; call Pipeline.stream again for another video")
        self._iterating = True
        return self._chunks()

    def _chunks(self) -> Iterator[StreamChunk]:
        if self._cancelled:
            return
        core = self._pipe._require_core()
        with python_names():
            stream = self._engine_stream = core.open(self._request)
        for embeds, mode in self._pending:
            stream.set_prompt(embeds, mode)
        try:
            for chunk in stream:
                timings = {"dit": chunk.dit_ms, "decode": chunk.decode_ms, "elapsed": chunk.elapsed_ms}
                if chunk.switch is not None:
                    timings["switch"] = chunk.switch_ms
                frames = None if chunk.frames is None else chunk.frames[0].numpy()
                latents = chunk.latents if self._latents else None
                yield StreamChunk(
                    chunk.index, chunk.start_frame, frames, latents, timings, chunk.prompt_version
                )
        finally:
            stream.cancel()  # a consumer that walks away ends the stream: its slot is free at once

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if self._engine_stream is not None:
            self._engine_stream.cancel()


def _setting_parameters() -> list[inspect.Parameter]:
    params = [inspect.Parameter("text_encoder", inspect.Parameter.KEYWORD_ONLY, default=None)]
    for cls in SECTIONS.values():
        for name in cls.names():
            if name != "text_encoder":
                default = cls.__dataclass_fields__[name].default
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return params


def check_frames(frames) -> int:
    """A request's frames (not None) as an int; ConfigError naming frames otherwise."""
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)):
        raise ConfigError(f"{arg('frames', frames)} must be an integer (4*k + 1 video frames) or None")
    return int(frames)


class Pipeline:
    """A warm streaming pipeline: one model source, its KV cache slots, decoder and ranks, for many
    requests. Its keywords are the run settings of ropesp.settings (the flags of `ropesp generate`, by
    their Python names): the model source (none: the embedded demo model; preset, checkpoint,
    model_config, model_dir, engines), the video (height/width in pixels, frames: the default video
    length, which also sizes the KV cache, max_frames, local_attn_frames/sink_frames: a rolling window for
    unbounded streams), the sampler (steps, shift, chunk_frames, ...), parallel (world_size: ranks
    spawned and owned here, ...), compute (backend, dtype, device, precision, attention, cuda_graphs),
    decode (decoder "preview" | "vae" | "taehv" | "none", vae, taehv, vae_compile, decode_device,
    overlap_decode), prompt (prompt_mode: set_prompt's default) and streams (max_streams: streams at once,
    realtime_fps).
    text_encoder: an object with encode(str) -> [1, L, text_dim] embeddings, or a umT5 directory; default:
    the model's own encoder (the demo model's), else model_dir's umT5.
    """

    def __init__(self, *, text_encoder: Any = None, **settings: Any) -> None:
        self._core = None
        with python_names():
            encoder = None
            if text_encoder is not None and not isinstance(text_encoder, (str, os.PathLike)):
                if not callable(getattr(text_encoder, "encode", None)):
                    raise ConfigError(
                        f"{arg('text_encoder')} must be a directory or have encode(text) -> embeddings"
                    )
                encoder = text_encoder
            elif text_encoder is not None:
                settings["text_encoder"] = os.fspath(text_encoder)
            self._start(RunConfig.of(**settings), encoder)

    @classmethod
    def from_config(cls, config: RunConfig, text_encoder: Any = None) -> Pipeline:
        """A Pipeline of run settings already gathered (a front end's flags: its errors name them as the
        front end does, flags unless the caller is inside errors.python_names)."""
        pipe = cls.__new__(cls)
        pipe._core = None
        pipe._start(config, text_encoder)
        return pipe

    def _start(self, config: RunConfig, encoder) -> None:
        from ropesp.runtime.engine_core import EngineCore
        from ropesp.runtime.pipeline import resolve
        from ropesp.runtime.prompts import PromptEncoder

        if config.video.unbounded:
            raise ConfigError(f"{arg('frames', 0)}: give streams without end with stream(frames=None)")
        res = resolve(config)
        self.config, self.resolved = res.config, res
        self.prompt_mode = config.prompt.prompt_mode
        self._prompts = PromptEncoder(res, encoder)
        self._core = EngineCore(res).start()

    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *_setting_parameters()]
    )

    # --- properties ------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.resolved.world_size

    @property
    def text_dim(self) -> int:
        """Width of prompt embeddings [L, text_dim] the model takes."""
        return self.resolved.model.text_dim

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels of the frames it makes."""
        g = self.resolved.geometry
        return g.latent_height * 8, g.latent_width * 8

    @property
    def frames(self) -> int:
        """The default video length in frames (stream and generate without frames=)."""
        return 4 * self.resolved.latent_frames - 3

    @property
    def max_streams(self) -> int:
        return self.resolved.max_streams

    @property
    def workers(self) -> list:
        """The processes of ranks 1..P-1 (empty at world size 1)."""
        return self._core.workers if self._core is not None else []

    def description(self) -> str:
        """One line on what it runs: model, backend, device, world size."""
        res = self.resolved
        source = res.config.source
        model = source.engines or source.checkpoint or f"{source.preset} preset"
        return f"{Path(model).name if os.sep in str(model) else model} · {res.backend} · {res.device} · {res.world_size} rank(s)"

    # --- requests --------------------------------------------------------------------------------
    def encode(self, prompt: str | torch.Tensor) -> torch.Tensor:
        """A prompt -> float32 embeddings [1, L, text_dim] (text through the text encoder), checked."""
        core = self._require_core()  # a closed Pipeline loads no text encoder again
        with python_names():
            if not isinstance(prompt, (str, torch.Tensor)):
                raise ConfigError(
                    f"{arg('prompt')} must be text or an embeddings tensor [L, {self.text_dim}]"
                )
            return core.check_prompt(self._prompts(prompt), "prompt")

    def stream(
        self,
        prompt: str | torch.Tensor,
        seed: int = 0,
        frames: int | None = _DEFAULT,  # type: ignore[assignment]
        recache: bool = False,
        latents: bool = False,
    ) -> Stream:
        """A stream of `frames` video frames (4k+1; default: the pipeline's length; None: until
        cancelled, which needs local_attn_frames). recache=True makes "recache" the default mode of this
        stream's set_prompt. Iterate it for StreamChunks; the work starts with the iteration."""
        return self._stream(prompt, seed, frames, recache, latents, live=True)

    def _stream(self, prompt, seed, frames, recache: bool, latents: bool, live: bool) -> Stream:
        """stream(); live: set_prompt may come while it runs (the DiT then stays a few chunks ahead of
        the consumer, not the whole video: StreamRequest.live)."""
        core = self._require_core()
        with python_names():
            seed = check_seed(seed)
            request = core.request(
                self.encode(prompt),
                seed,
                self._latent_frames(frames),
                decode=self.resolved.decoder != "none",
                live=live,
            )
        mode = "recache" if recache else self.prompt_mode
        return Stream(self, request, latents, mode)

    def warm_up(self, prompt: str | torch.Tensor, frames: int | None = _DEFAULT) -> float:  # type: ignore[assignment]
        """Run throwaway streams of `prompt` so that the first requests start warm; returns its ms. On a GPU
        one stream per KV cache slot at once, a few chunks each (every slot's CUDA graphs captured), else
        one stream's first chunk. frames: as in stream() (None: an unbounded stream's window)."""
        core = self._require_core()
        with python_names():
            return core.warm_up(self.encode(prompt), self._latent_frames(frames))

    def _latent_frames(self, frames) -> int | None:
        """A request's video frames (_DEFAULT: the pipeline's length; None: unbounded) -> latent frames."""
        if frames is _DEFAULT:
            frames = self.frames
        return None if frames is None else latent_frames_for(check_frames(frames))

    def generate(self, prompt: str | torch.Tensor, seed: int = 0, frames: int = _DEFAULT) -> Video:  # type: ignore[assignment]
        """The whole video at once (frames: 4k+1 video frames; default: the pipeline's length)."""
        if frames is None:
            with python_names():
                raise ConfigError(f"{arg('frames', None)}: generate() makes a bounded video; use stream()")
        chunks = tuple(self._stream(prompt, seed, frames, recache=False, latents=True, live=False))
        latents = torch.cat([c.latents for c in chunks], dim=1)
        video = None if chunks[0].frames is None else np.concatenate([c.frames for c in chunks])
        return Video(video, latents, chunks)

    # --- life ------------------------------------------------------------------------------------
    def _require_core(self):
        if self._core is None:
            raise RuntimeError("this Pipeline is closed")
        return self._core

    def close(self) -> None:
        """Stop every stream and every rank; idempotent."""
        core, self._core = self._core, None
        if core is not None:
            core.close()
        self._prompts = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
