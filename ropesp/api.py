"""The Python API: `ropesp.Pipeline`, a warm pipeline (every rank of it) that streams videos chunk by chunk.

    import ropesp
    with ropesp.Pipeline(device="cpu") as pipe:          # the default model, preview frames
        stream = pipe.stream(prompt, seed=0, frames=33)
        for chunk in stream:                             # StreamChunk: frames [N, H, W, 3] uint8, timings
            stream.set_prompt(other)                     # from another thread too: at the next chunk
        video = pipe.generate(prompt, seed=1)            # Video: frames [N, H, W, 3], latents [1, F, C, h, w]

The pipeline is built once (model or engines, KV cache, CUDA graphs, decoder) and serves request after
request; with world_size > 1 it starts ranks 1..P-1 as worker processes (runtime/group.py) and owns them
until close(). One stream runs at a time: starting another ends the running one after its current chunk.
Errors are RopespError subclasses (ConfigError is also a ValueError) whose messages name the Python
arguments of this module.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ropesp.config import SamplerConfig, latent_frames_for
from ropesp.errors import ConfigError, arg, python_names
from ropesp.runtime.session import check_prompt_mode

DECODERS = ("preview", "vae", None)
PROMPT_CACHE = 16
"""Text prompts whose embeddings a Pipeline keeps (a stream switching back and forth encodes once)."""


@dataclass(frozen=True)
class StreamChunk:
    """One finished chunk of a stream."""

    index: int
    """Chunk number, from 0."""
    start_frame: int
    """Latent frame of the chunk's first frame in the stream."""
    frames: np.ndarray | None
    """[N, H, W, 3] uint8 video frames (None for decoder=None)."""
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
    """[N, H, W, 3] uint8 (None for decoder=None)."""
    latents: torch.Tensor
    """[1, F, C, h, w] float32."""
    chunks: tuple[StreamChunk, ...]
    """The chunks it came in (their timings; their latents and frames are the ones above)."""


class Stream:
    """One running video: iterate it for StreamChunks; set_prompt / cancel from any thread."""

    def __init__(self, pipe: Pipeline, request, latents: bool, mode: str) -> None:
        self._pipe, self._request, self._latents, self._mode = pipe, request, latents, mode
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._pending: list[tuple[torch.Tensor, str]] = []
        self._iterator: Iterator[StreamChunk] | None = None
        self._done = threading.Event()

    def set_prompt(self, prompt: str | torch.Tensor, mode: str | None = None) -> None:
        """Change the prompt from the next chunk the DiT starts on. Thread-safe. prompt: text or
        embeddings [L, text_dim] / [1, L, text_dim]; mode: "swap" (cross-attention K/V only) or "recache"
        (also recompute the window's self-attention cache under the new prompt); default: the Pipeline's
        prompt_mode."""
        with python_names():
            mode = check_prompt_mode(mode or self._mode)
            embeds = self._pipe.encode(prompt)
        with self._lock:
            self._pending.append((embeds, mode))

    def cancel(self) -> None:
        """End the stream after the current chunk. Thread-safe."""
        self._cancel.set()

    def close(self) -> None:
        """Cancel and release the pipeline now (the consumer's thread; a stream another thread is
        iterating ends after its current chunk instead)."""
        self.cancel()
        if self._iterator is not None:
            try:
                self._iterator.close()
            except ValueError:  # being iterated by another thread: it stops at the chunk boundary
                pass

    def _take(self) -> tuple[torch.Tensor, str] | None:
        with self._lock:
            if not self._pending:
                return None
            pending, self._pending = self._pending, []
        mode = "recache" if any(m == "recache" for _, m in pending) else "swap"
        return pending[-1][0], mode

    def __iter__(self) -> Iterator[StreamChunk]:
        if self._iterator is not None:
            raise RuntimeError("a Stream is iterated once; call Pipeline.stream again for another video")
        self._iterator = self._chunks()
        return self._iterator

    def _chunks(self) -> Iterator[StreamChunk]:
        group = self._pipe._acquire(self)
        try:
            for chunk in group.stream(self._request, self._cancel.is_set, self._take):
                timings = {"dit": chunk.dit_ms, "decode": chunk.decode_ms, "elapsed": chunk.elapsed_ms}
                if chunk.switch is not None:
                    timings["switch"] = chunk.switch_ms
                frames = None if chunk.frames is None else chunk.frames[0].numpy()
                yield StreamChunk(
                    chunk.index,
                    chunk.start_frame,
                    frames,
                    chunk.latents if self._latents else None,
                    timings,
                    chunk.prompt_version,
                )
        finally:
            self._done.set()
            self._pipe._release(self)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _demo_module():
    """ropesp.demo (the embedded default model and its prompt encoder) where this ropesp ships it."""
    try:
        import ropesp.demo as demo
    except ImportError:
        return None
    return demo if hasattr(demo, "default_checkpoint") else None


class Pipeline:
    """A warm streaming pipeline: one model source, its cache, decoder and ranks, for many requests.

    Model source (one of; none: the embedded default model): preset (random weights without a
    checkpoint), checkpoint (+ model_config), model_dir (diffusers Wan2.1: DiT, VAE, umT5), engines
    (a `ropesp build` directory; backend, world size, device and dtype default to the build's).
    device "cuda" | "cpu", dtype "float32" | "bfloat16" | "float16", backend "eager" | "compile" |
    "ort" | "aoti" | "tensorrt"; world_size ranks (spawned and owned here); decoder "preview" (fast
    latent preview), "vae" (the Wan VAE from vae= or model_dir) or None (latents only); precision "bf16" |
    "fp8" (the blocks' GEMMs in e4m3) | "fp8-ffn" (the FFN's alone) and attention "sdpa" | "fa3" |
    "fp8" | "int8" (the self-attention kernel) as `ropesp generate --precision / --attention`;
    collective_timeout_s bounds how long a rank waits for the others while streaming (default: 60 s,
    300 s with backend "compile").
    Video (latent units, as the CLI): height/width in pixels, max_frames (KV cache in latent frames,
    default the model's default video), local_attn_frames/sink_frames (rolling window, sink included:
    unbounded streams), chunk_frames, independent_first_frame, steps, shift.
    Text prompts go through text_encoder (an object with encode(str) -> [1, L, text_dim], or a umT5
    directory), else the model's own encoder (the demo model's), else model_dir's umT5 (the one choice
    of runtime.prompts.text_encoder_for, as `ropesp generate`'s); prompt_mode is set_prompt's default
    ("swap" | "recache").
    """

    def __init__(
        self,
        preset: str | None = None,
        checkpoint: str | None = None,
        model_dir: str | None = None,
        engines: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        backend: str | None = None,
        precision: str | None = None,
        world_size: int = 1,
        decoder: str | None = "preview",
        *,
        attention: str | None = None,
        collective_timeout_s: float | None = None,
        model_config: str | None = None,
        height: int | None = None,
        width: int | None = None,
        max_frames: int | None = None,
        local_attn_frames: int = -1,
        sink_frames: int = 0,
        chunk_frames: int = 3,
        independent_first_frame: bool = False,
        steps: Sequence[int] = SamplerConfig.steps,
        shift: float = SamplerConfig.shift,
        text_encoder=None,
        vae: str | None = None,
        vae_compile: bool = False,
        decode_device: str | None = None,
        ulysses_degree: int | None = None,
        ring_degree: int | None = None,
        cuda_graphs: bool = True,
        prompt_mode: str = "swap",
    ) -> None:
        self._group = None
        self._active: Stream | None = None
        self._cond = threading.Condition()
        self._prompts: OrderedDict[str, torch.Tensor] = OrderedDict()
        with python_names():
            self._build(locals())

    def _build(self, kw: dict) -> None:
        from ropesp.runtime.group import SessionGroup
        from ropesp.runtime.pipeline import PipelineConfig
        from ropesp.runtime.prompts import text_encoder_for

        if kw["decoder"] not in DECODERS:
            raise ConfigError(f"{arg('decoder', kw['decoder'])}: choose one of {DECODERS}")
        self.prompt_mode = check_prompt_mode(kw["prompt_mode"])
        if not isinstance(kw["world_size"], int) or kw["world_size"] < 1:
            raise ConfigError(f"{arg('world_size', kw['world_size'])} must be an integer >= 1")
        checkpoint, md = kw["checkpoint"], None
        demo = _demo_module()
        named = ("preset", "checkpoint", "model_dir", "engines", "model_config")
        if demo is not None and demo.has_default_weights() and not any(kw[name] for name in named):
            checkpoint = str(demo.default_checkpoint())  # the embedded default model
        if kw["model_dir"] is not None:
            from ropesp.model_dir import resolve_model_dir

            md = resolve_model_dir(kw["model_dir"], checkpoint)
            checkpoint = str(md.dit_weights)
        latent = {}
        for name in ("height", "width"):
            px = kw[name]
            if px is not None and (not isinstance(px, int) or px < 16 or px % 16):
                raise ConfigError(f"{arg(name, px)} must be a positive multiple of 16 pixels")
            latent[name] = None if px is None else px // 8
        config = PipelineConfig(
            checkpoint=checkpoint,
            model_config=kw["model_config"],
            preset=kw["preset"],
            engines=kw["engines"],
            backend=kw["backend"],
            latent_height=latent["height"],
            latent_width=latent["width"],
            sampler=SamplerConfig(
                steps=tuple(kw["steps"]),
                shift=kw["shift"],
                chunk_frames=kw["chunk_frames"],
                independent_first_frame=kw["independent_first_frame"],
            ),
            max_frames=kw["max_frames"],
            local_attn_frames=kw["local_attn_frames"],
            sink_frames=kw["sink_frames"],
            dtype=kw["dtype"],
            device=kw["device"],
            world_size=kw["world_size"],
            ulysses_degree=kw["ulysses_degree"],
            ring_degree=kw["ring_degree"],
            cuda_graphs=kw["cuda_graphs"],
            collective_timeout_s=kw["collective_timeout_s"],
        )
        if kw["precision"] is not None:
            config = dataclasses.replace(config, precision=kw["precision"])
        if kw["attention"] is not None:
            config = dataclasses.replace(config, attention=kw["attention"])
        if kw["engines"] is not None and kw["world_size"] == 1:
            config = dataclasses.replace(config, world_size=None)  # the engines' world size
        res = config.resolve()
        self.config, self.resolved = config, res
        own = demo.own_text_encoder(res.model) if demo is not None else None
        self._text = text_encoder_for(kw["text_encoder"], md, own)
        self._text_encoder = None  # self._text's, loaded at the first text prompt
        decoder = self._decoder(res, kw, md)
        self._group = SessionGroup(config, decoder=decoder).start()

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

    # --- building blocks ---------------------------------------------------------------------------
    @staticmethod
    def _decoder(res, kw: dict, md):
        from ropesp.runtime.dist import Mapping, device_for
        from ropesp.runtime.pipeline import lead_decoder

        name = kw["decoder"]
        if name is None:
            return None
        vae = kw["vae"] or (str(md.vae) if md is not None and name == "vae" else None)
        if name == "vae" and vae is None:
            raise ConfigError(
                f"{arg('decoder', 'vae')} needs a Wan VAE: pass {arg('vae')} or {arg('model_dir')}"
            )
        if name == "preview" and (kw["vae"] or kw["vae_compile"]):
            raise ConfigError(f"{arg('vae')} and {arg('vae_compile')} are for {arg('decoder', 'vae')}")
        device = device_for(Mapping(res.world_size), res.device)
        return lead_decoder(
            res,
            vae if name == "vae" else None,
            device,
            compile=kw["vae_compile"],
            decode_device=kw["decode_device"],
            flag=arg("decode_device"),
        )

    def encode(self, prompt: str | torch.Tensor) -> torch.Tensor:
        """A prompt -> checked float32 embeddings [1, L, text_dim] (text through the text encoder)."""
        group = self._require_group()  # a closed Pipeline loads no text encoder again
        with python_names():
            if isinstance(prompt, str):
                prompt = self._encode_text(prompt)
            if not isinstance(prompt, torch.Tensor):
                raise ConfigError(
                    f"{arg('prompt')} must be text or an embeddings tensor [L, {self.text_dim}]"
                )
            if prompt.is_floating_point():
                prompt = prompt.detach().to("cpu", torch.float32)
            return group.check_prompt(prompt)

    def _encode_text(self, text: str) -> torch.Tensor:
        if text in self._prompts:
            self._prompts.move_to_end(text)
            return self._prompts[text]
        if self._text is None:
            raise ConfigError(
                f"{arg('prompt')} is text, but this Pipeline has no text encoder: pass {arg('text_encoder')} "
                f"or {arg('model_dir')}, or give embeddings [L, {self.text_dim}]"
            )
        if self._text_encoder is None:
            from ropesp.runtime.dist import Mapping, device_for

            res = self.resolved
            device = device_for(Mapping(res.world_size), res.device)
            self._text_encoder = self._text.load(res.model, res.dtype, device)
        with torch.inference_mode():
            embeds = self._text_encoder.encode(text).detach().to("cpu", torch.float32)
        self._prompts[text] = embeds
        if len(self._prompts) > PROMPT_CACHE:
            self._prompts.popitem(last=False)
        return embeds

    # --- requests --------------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | torch.Tensor,
        seed: int = 0,
        frames: int | None = 33,
        recache: bool = False,
        latents: bool = False,
    ) -> Stream:
        """A stream of `frames` video frames (4k+1; None: until cancelled, needs local_attn_frames).
        recache=True makes "recache" the default mode of this stream's set_prompt. Iterate it for
        StreamChunks; the work starts with the iteration."""
        with python_names():
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ConfigError(f"{arg('seed', seed)} must be an integer")
            latent_frames = None if frames is None else latent_frames_for(frames)
            embeds = self.encode(prompt)
            request = self._require_group().check(embeds, seed, latent_frames, frames=True)
        mode = "recache" if recache else self.prompt_mode
        return Stream(self, request, latents, mode)

    def generate(self, prompt: str | torch.Tensor, seed: int = 0, frames: int = 33) -> Video:
        """The whole video at once (frames: 4k+1 video frames)."""
        if frames is None:
            with python_names():
                raise ConfigError(f"{arg('frames', None)}: generate() makes a bounded video; use stream()")
        chunks = tuple(self.stream(prompt, seed, frames, latents=True))
        latents = torch.cat([c.latents for c in chunks], dim=1)
        video = None if chunks[0].frames is None else np.concatenate([c.frames for c in chunks])
        return Video(video, latents, chunks)

    # --- one stream at a time ---------------------------------------------------------------------
    def _require_group(self):
        if self._group is None:
            raise RuntimeError("this Pipeline is closed")
        return self._group

    def _acquire(self, stream: Stream):
        """Make `stream` the running one; a running other one is ended after its current chunk first."""
        with self._cond:
            while self._active is not None and self._active is not stream:
                other = self._active
                other.close()  # ends it now if suspended, else at its next chunk boundary
                if self._active is other:
                    self._cond.wait(0.05)
            self._active = stream
            return self._require_group()

    def _release(self, stream: Stream) -> None:
        with self._cond:
            if self._active is stream:
                self._active = None
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the running stream and every rank; idempotent."""
        group, self._group = self._group, None
        if self._active is not None:
            self._active.close()
        if group is not None:
            group.close()
        self._text_encoder = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
