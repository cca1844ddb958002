"""The Python API: resolve what the user asked for into a ready StreamSession on this rank.

    from ropesp.runtime.pipeline import PipelineConfig, build_session
    session = build_session(PipelineConfig(preset="tiny"))
    session.reset(prompt_embeds, seed=0)
    for chunk in session: ...

`PipelineConfig.resolve()` validates everything that can be checked without a process group, so a
launcher can refuse bad input once, before it starts any rank.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ropesp.config import (
    CacheConfig,
    ModelConfig,
    PresetDefaults,
    SamplerConfig,
    VideoGeometry,
    preset,
)
from ropesp.errors import ConfigError, arg
from ropesp.parallel import SPLayout
from ropesp.runtime.dist import Mapping
from ropesp.runtime.session import StreamSession

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("eager", "compile", "ort", "aoti", "tensorrt")
MODEL_BACKENDS = ("eager", "compile")
"""Backends that run the PyTorch model itself (no --engines); the others run `ropesp build` artifacts."""
DEFAULT_PRESET = "tiny"
COLLECTIVE_TIMEOUT_S = 60.0
"""Default bound on a streaming collective's wait for the other ranks (interactive use)."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a session needs; None means 'the default for this model/device'."""

    checkpoint: str | None = None
    """Self-Forcing .pt, Wan safetensors (file, index or dir) or diffusers transformer dir."""
    model_config: str | None = None
    """Wan config.json; else next to the checkpoint, else matched by tensor shapes."""
    preset: str | None = None
    """Named preset (tiny, wan2.1-1.3b, wan2.1-14b); random weights without a checkpoint."""
    engines: str | None = None
    """Engine directory from `ropesp build`."""
    backend: str | None = None
    """eager | compile (regional torch.compile + CUDA graphs) | ort | aoti | tensorrt; defaults to the
    engines' backend, else eager."""
    latent_height: int | None = None
    latent_width: int | None = None
    latent_frames: int | None = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    max_frames: int | None = None
    """KV cache capacity in frames without a rolling window (default: the video's length)."""
    local_attn_frames: int = -1
    sink_frames: int = 0
    dtype: str | None = None
    """float32 | bfloat16 | float16 (default: bfloat16 on cuda, float32 on cpu)."""
    device: str | None = None
    """cuda | cpu (default: cuda when a GPU is present)."""
    world_size: int | None = None
    sp_rope: str = "local"
    sp_comm: str = "fused"
    ulysses_degree: int | None = None
    """U of the hybrid layout P = U x R (default: the largest divisor of P and the heads)."""
    ring_degree: int | None = None
    """R of the hybrid layout (default: P / U)."""
    cuda_graphs: bool = True
    collective_timeout_s: float | None = None
    """Seconds a collective waits for the other ranks while streaming before the run stops and names
    the stalled rank (setup before the first chunk may take longer: loading, compiling). None:
    COLLECTIVE_TIMEOUT_S, except for backend compile, whose graphs compile during the first chunks at
    a pace that differs between ranks: it keeps the join timeout."""
    precision: str = "bf16"
    """bf16 | fp8: the blocks' Linear layers as e4m3 GEMMs (torchao, quantized once at load;
    plugins/fp8.py); the eager and compile backends, CUDA compute capability >= 8.9, bfloat16."""
    attention: str = "sdpa"
    """sdpa | fa3 | fp8 | int8: the self-attention kernel over the KV cache (plugins/attention_8bit.py)."""

    def check_precision(self, backend: str, device: str, dtype_name: str, layout: SPLayout) -> None:
        """Refuse --precision / --attention where they cannot run, naming the flag and the reason."""
        from ropesp.plugins.attention_8bit import ATTENTION_MODES, check_attention
        from ropesp.plugins.fp8 import PRECISIONS, check_fp8

        if self.precision not in PRECISIONS:
            raise ConfigError(f"{arg('precision', self.precision)}; choose one of {PRECISIONS}")
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"{arg('attention', self.attention)}; choose one of {ATTENTION_MODES}")
        if self.precision == "fp8":
            if backend not in MODEL_BACKENDS:
                raise ConfigError(
                    f"{arg('precision', 'fp8')} quantizes the PyTorch model at load: use "
                    f"{arg('backend', 'eager')} or compile "
                    f"(the {backend} engines of `ropesp build` run in their build dtype)"
                )
            check_fp8(device, arg("precision", "fp8"))
            if dtype_name != "bfloat16":
                raise ConfigError(
                    f"{arg('precision', 'fp8')} runs on bfloat16 activations, not {arg('dtype', dtype_name)}: "
                    f"pass {arg('dtype', 'bfloat16')} (the default on CUDA)"
                )
        if self.attention != "sdpa":
            if layout.ring > 1:
                raise ConfigError(
                    f"{arg('attention', self.attention)} runs with pure Ulysses or one rank; the ring layout "
                    f"{layout} merges partial attentions that only {arg('attention', 'sdpa')} returns"
                )
            check_attention(self.attention, device, arg("attention"))

    def resolve(self) -> ResolvedPipeline:
        """Fill defaults and validate; raises ConfigError/CheckpointError with actionable text."""
        from ropesp import limits

        limits.check_positive(
            latent_height=self.latent_height,
            latent_width=self.latent_width,
            latent_frames=self.latent_frames,
            max_frames=self.max_frames,
            world_size=self.world_size,
            ulysses_degree=self.ulysses_degree,
            ring_degree=self.ring_degree,
        )
        timeout = self.collective_timeout_s
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"--collective-timeout {timeout} must be > 0 seconds")
        manifest = None
        if self.engines:
            from ropesp.export.manifest import Manifest  # stdlib-only reader

            manifest = Manifest.load(self.engines)
        # with engines, device and dtype default to what they were built for
        device = self.device or (manifest.device if manifest else None)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"{arg('device', device)}; choose cuda or cpu")
        dtype_name = self.dtype or (manifest.dtype if manifest else None)
        dtype_name = dtype_name or ("bfloat16" if device == "cuda" else "float32")
        if dtype_name not in DTYPES:
            raise ConfigError(f"{arg('dtype', dtype_name)}; choose one of {sorted(DTYPES)}")
        backend = self.backend or (manifest.backend_for_runtime() if manifest else "eager")
        if backend not in BACKENDS:
            raise ConfigError(f"{arg('backend', backend)}; choose one of {BACKENDS}")
        if backend not in MODEL_BACKENDS and manifest is None:
            raise ConfigError(
                f"{arg('backend', backend)} needs {arg('engines')} (a directory from `ropesp build`)"
            )
        if backend in MODEL_BACKENDS and manifest is not None:
            raise ConfigError(
                f"{arg('backend', backend)} runs the PyTorch model, not engines: drop {arg('engines')}, or use "
                f"{arg('backend', manifest.backend_for_runtime())} for {self.engines}"
            )
        cfg, defaults, random_weights = self._model_config(manifest)
        geometry = VideoGeometry(
            self.latent_height or defaults.latent_height,
            self.latent_width or defaults.latent_width,
            cfg.patch_size,
        )
        if cfg.pos_grid is not None and (geometry.rows, geometry.cols) != tuple(cfg.pos_grid):
            _, ph, pw = cfg.patch_size
            raise ConfigError(
                f"the model's position embedding is for a {cfg.pos_grid[0] * ph} x {cfg.pos_grid[1] * pw} "
                f"latent grid; drop --latent-height/--latent-width ({geometry.latent_height} x "
                f"{geometry.latent_width}) or give those sizes"
            )
        frames = self.latent_frames or defaults.latent_frames
        chunks = self.sampler.chunk_sizes(frames)
        local_attn, sink = self.local_attn_frames, self.sink_frames
        if manifest is not None and local_attn == -1 and not sink:  # the engines' rolling window
            local_attn, sink = manifest.local_attn_frames, manifest.sink_frames
        cache = CacheConfig(self.max_frames or frames, local_attn, sink)
        if cache.rolling and cache.local_attn_frames < cache.sink_frames + max(chunks):
            raise ConfigError(
                f"{arg('local_attn_frames', cache.local_attn_frames)} must be >= "
                f"{arg('sink_frames', cache.sink_frames)} + chunk frames {max(chunks)}"
            )
        if not cache.rolling and frames > cache.max_frames:
            raise ConfigError(
                f"{frames} latent frames exceed the KV cache of {cache.max_frames} frames; raise "
                f"{arg('max_frames')} or use a rolling window ({arg('local_attn_frames')}/{arg('sink_frames')})"
            )
        requested = self.world_size
        if requested is None and manifest is not None and "WORLD_SIZE" not in os.environ:
            requested = manifest.world_size  # engines default to the world size they were built for
        world = Mapping.from_env(requested).world_size
        if manifest is not None:
            manifest.check_world_size(world)  # before any rank starts
        limits.check_rank_count(world, min(chunks) * geometry.frame_tokens)
        layout = SPLayout.choose(cfg.num_heads, world, self.ulysses_degree, self.ring_degree)
        itemsize = DTYPES[dtype_name].itemsize
        limits.check_cache_fits(cfg, geometry.frame_tokens, cache, itemsize, world, device)
        self.check_precision(backend, device, dtype_name, layout)
        return ResolvedPipeline(
            self,
            cfg,
            geometry,
            frames,
            cache,
            device,
            DTYPES[dtype_name],
            backend,
            world,
            random_weights,
            manifest,
            layout,
        )

    def _model_config(self, manifest) -> tuple[ModelConfig, PresetDefaults, bool]:
        if manifest is not None:
            cfg = manifest.model_config()
            g = manifest.geometry
            return cfg, PresetDefaults(g["latent_height"], g["latent_width"], manifest.max_frames), False
        if self.checkpoint:
            from ropesp.model.checkpoint import peek_config

            cfg = peek_config(self.checkpoint, self.model_config, self.preset)
            name = _preset_of(cfg)
            defaults = preset(name)[1] if name else preset("wan2.1-1.3b")[1]
            return cfg, defaults, False
        if self.model_config:
            cfg = ModelConfig.from_json(self.model_config)
            return cfg, preset(_preset_of(cfg) or "wan2.1-1.3b")[1], True
        cfg, defaults = preset(self.preset or DEFAULT_PRESET)
        return cfg, defaults, True


def _preset_of(cfg: ModelConfig) -> str | None:
    from ropesp.config import PRESETS

    for name, (make, _) in PRESETS.items():
        if make() == cfg:
            return name
    return None


@dataclass(frozen=True)
class ResolvedPipeline:
    """A validated PipelineConfig with every default filled in."""

    request: PipelineConfig
    model: ModelConfig
    geometry: VideoGeometry
    latent_frames: int
    cache: CacheConfig
    device: str
    dtype: torch.dtype
    backend: str
    world_size: int
    random_weights: bool
    manifest: object | None
    layout: SPLayout


def lead_decoder(
    res: ResolvedPipeline,
    vae: str | None,
    device: torch.device,
    *,
    compile: bool = False,
    decode_device: str | None = None,
    flag: str = "--decode-device",
):
    """Rank 0's stream decoder for this pipeline: the preview (vae None) on `device`, or the Wan VAE there
    or on decode_device (checked, named `flag` in errors); a compiled one is warmed up for the pipeline's
    latent size here, before any chunk. Raises CheckpointError for an unreadable VAE."""
    from ropesp.decode.factory import WarmUp, make_decoder
    from ropesp.runtime.dist import parse_device

    where = parse_device(decode_device, flag) if decode_device else device
    g = res.geometry
    warm = WarmUp(g.latent_height, g.latent_width, res.request.sampler.chunk_frames)
    return make_decoder(vae, where, res.dtype, compile, warm)


def load_model(res: ResolvedPipeline, device: torch.device):
    """The eager model on device: the engines' weights (with --engines, e.g. for the eager baselines of
    `ropesp bench`), checkpoint weights, or the preset's seeded random ones; with precision fp8 its
    block Linears quantized once, here."""
    model = _load_weights(res, device)
    if res.request.precision == "fp8":
        from ropesp.plugins.fp8 import apply_fp8

        apply_fp8(model)
    return model


def _load_weights(res: ResolvedPipeline, device: torch.device):
    if res.manifest is not None:
        from ropesp.runtime.engine import load_weights

        return load_weights(res.manifest, device)
    if res.random_weights:
        from ropesp.model.wan import random_model

        return random_model(res.model, res.dtype, device)
    from ropesp.model.checkpoint import load_model as load_checkpoint

    model, _ = load_checkpoint(
        res.request.checkpoint,
        res.model,
        model_config_path=res.request.model_config,
        dtype=res.dtype,
        device=device,
    )
    return model


def make_state(res: ResolvedPipeline, mapping: Mapping, device: torch.device, *, comm=None, **overrides):
    """The SP state (cache, collectives, RoPE tables) of this rank; overrides replace request fields;
    comm: this rank's collectives (runtime/sp.py; default: over the default group)."""
    from ropesp.runtime.executor import SPState

    req = dataclasses.replace(res.request, **overrides) if overrides else res.request
    layout = res.layout if mapping.world_size == res.layout.world_size else SPLayout(1, 1)
    return SPState(
        res.model,
        res.geometry,
        res.cache,
        mapping,
        device,
        res.dtype,
        sp_rope=req.sp_rope,
        sp_comm=req.sp_comm,
        comm=comm,
        layout=layout,
        chunk_frames=req.sampler.chunk_sizes(res.latent_frames),
        attention=req.attention,
    )


def build_executor(res: ResolvedPipeline, mapping: Mapping, comm=None):
    """The executor of this rank for the resolved backend (comm: as make_state's)."""
    from ropesp.runtime.dist import device_for
    from ropesp.runtime.executor import EagerExecutor

    device = device_for(mapping, res.device)
    state = make_state(res, mapping, device, comm=comm)
    if res.backend in MODEL_BACKENDS:
        compiled = res.backend == "compile"
        return EagerExecutor(
            load_model(res, device), state, compile=compiled, cuda_graphs=compiled and res.request.cuda_graphs
        )
    from ropesp.runtime.engine import load_engine_executor

    return load_engine_executor(res, state, Path(res.request.engines), mapping)


def _group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def build_session(
    res: ResolvedPipeline | PipelineConfig,
    mapping: Mapping | None = None,
    decoder=None,
    comm=None,
    overlap_decode: bool | None = None,
    unbounded: bool = False,
):
    """A StreamSession on this rank (the process group must already exist for world size > 1).

    overlap_decode: decode chunk c while the DiT runs chunk c+1 (default: with a decoder on CUDA).
    unbounded: stream until the iterator is closed (needs the rolling window), not res.latent_frames.
    comm: this rank's collectives (runtime/sp.py): tests pass one with a CollectiveLog; bench's
    AloneCollectives run one rank of the group without its peers (no process group)."""
    if isinstance(res, PipelineConfig):
        res = res.resolve()
    mapping = mapping or Mapping.from_env(res.world_size)
    peers = mapping.world_size > 1 and (comm is None or comm.needs_peers)
    if peers and not _group_initialized():
        raise ConfigError(
            f"{arg('world_size', mapping.world_size)} needs its ranks: ropesp.Pipeline(world_size=...) "
            "starts and owns them (or runtime.group.SessionGroup); build_session runs one rank of a group "
            "that already exists (torchrun, or runtime.launch.spawn_ranks + process_group)"
        )
    executor = build_executor(res, mapping, comm)
    timeout = res.request.collective_timeout_s
    if timeout is None and res.backend != "compile":
        timeout = COLLECTIVE_TIMEOUT_S
    if peers and timeout is not None:
        from ropesp.runtime.dist import set_collective_timeout

        set_collective_timeout(timeout)  # every rank is set up: bound the waits from here on
    return StreamSession(
        executor,
        res.request.sampler,
        res.geometry,
        None if unbounded else res.latent_frames,
        decoder,
        overlap_decode=overlap_decode,
    )
