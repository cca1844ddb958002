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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ropesp.config import (
    CacheConfig,
    ComputeConfig,
    ModelConfig,
    ModelSource,
    ParallelConfig,
    PresetDefaults,
    SamplerConfig,
    VideoConfig,
    VideoGeometry,
    compose,
    flat_field,
)
from ropesp.dtypes import DTYPES, dtype_name
from ropesp.errors import ConfigError, arg
from ropesp.parallel import SPLayout
from ropesp.runtime.dist import Mapping
from ropesp.runtime.session import StreamSession

BACKENDS = ("eager", "compile", "ort", "aoti", "tensorrt")
MODEL_BACKENDS = ("eager", "compile")
"""Backends that run the PyTorch model itself (no --engines); the others run `ropesp build` artifacts."""
DEFAULT_PRESET = "tiny"
COLLECTIVE_TIMEOUT_S = 60.0
"""Default bound on a streaming collective's wait for the other ranks (interactive use)."""


_PARTS = ("source", "video", "parallel", "compute")


@dataclass(frozen=True, init=False)
class PipelineConfig:
    """Everything a session needs; None means 'the default for this model/device'.

    Composed of the sub-configs that `ropesp build` shares (ropesp/config.py); constructed and read
    flat as well: PipelineConfig(preset="tiny", world_size=2).parallel.world_size == 2, and
    config.world_size reads the same field."""

    source: ModelSource
    video: VideoConfig
    parallel: ParallelConfig
    compute: ComputeConfig
    sampler: SamplerConfig
    latent_frames: int | None
    """The video's length in latent frames (default: the model's)."""
    cuda_graphs: bool
    collective_timeout_s: float | None
    """Seconds a collective waits for the other ranks while streaming before the run stops and names
    the stalled rank (setup before the first chunk may take longer: loading, compiling). None:
    COLLECTIVE_TIMEOUT_S, except for backend compile, whose graphs compile during the first chunks at
    a pace that differs between ranks: it keeps the join timeout."""

    def __init__(
        self,
        *,
        source: ModelSource | None = None,
        video: VideoConfig | None = None,
        parallel: ParallelConfig | None = None,
        compute: ComputeConfig | None = None,
        sampler: SamplerConfig | None = None,
        latent_frames: int | None = None,
        cuda_graphs: bool = True,
        collective_timeout_s: float | None = None,
        **flat: Any,
    ) -> None:
        """flat: fields of the sub-configs by name (preset=..., sp_rope=...), applied over the given ones."""
        parts = dict(
            source=source or ModelSource(),
            video=video or VideoConfig(),
            parallel=parallel or ParallelConfig(),
            compute=compute or ComputeConfig(),
        )
        fields = dict(
            compose("PipelineConfig", parts, flat),
            sampler=sampler if sampler is not None else SamplerConfig(),
            latent_frames=latent_frames,
            cuda_graphs=cuda_graphs,
            collective_timeout_s=collective_timeout_s,
        )
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        return flat_field(self, _PARTS, name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the sub-configs' fields flat, the sampler nested."""
        raw: dict[str, Any] = {}
        for part in _PARTS:
            raw.update(getattr(self, part).to_dict())
        sampler = dataclasses.asdict(self.sampler)
        sampler["steps"] = list(self.sampler.steps)
        extra = {"latent_frames": self.latent_frames, "cuda_graphs": self.cuda_graphs}
        return {**raw, **extra, "sampler": sampler, "collective_timeout_s": self.collective_timeout_s}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PipelineConfig:
        """Inverse of to_dict; unknown keys are refused by name."""
        raw = dict(raw)
        sampler = dict(raw.pop("sampler", {}))
        unknown = sorted(set(raw) - set(cls().to_dict()))
        if unknown:
            raise ConfigError(f"pipeline config has unknown fields {unknown}")
        if "steps" in sampler:
            sampler["steps"] = tuple(sampler["steps"])
        return cls(sampler=SamplerConfig(**sampler), **raw)

    def check_precision(
        self, backend: str, device: str, dtype_name: str, layout: SPLayout, head_dim: int | None = None
    ) -> None:
        """Refuse --precision / --attention where they cannot run (head_dim: the model's), naming the
        flag and the reason."""
        from ropesp.plugins.attention_8bit import ATTENTION_MODES, check_attention
        from ropesp.plugins.fp8 import PRECISIONS, check_fp8

        precision, attention = self.compute.precision, self.compute.attention
        if precision not in PRECISIONS:
            raise ConfigError(f"{arg('precision', precision)}; choose one of {PRECISIONS}")
        if attention not in ATTENTION_MODES:
            raise ConfigError(f"{arg('attention', attention)}; choose one of {ATTENTION_MODES}")
        if precision != "bf16":
            if backend not in MODEL_BACKENDS:
                raise ConfigError(
                    f"{arg('precision', precision)} quantizes the PyTorch model at load: use "
                    f"{arg('backend', 'eager')} or compile "
                    f"(the {backend} engines of `ropesp build` run in their build dtype)"
                )
            check_fp8(device, arg("precision", precision))
            if dtype_name != "bfloat16":
                raise ConfigError(
                    f"{arg('precision', precision)} runs on bfloat16 activations, not {arg('dtype', dtype_name)}: "
                    f"pass {arg('dtype', 'bfloat16')} (the default on CUDA)"
                )
        if attention != "sdpa":
            if layout.ring > 1:
                raise ConfigError(
                    f"{arg('attention', attention)} runs with pure Ulysses or one rank; the ring layout "
                    f"{layout} merges partial attentions that only {arg('attention', 'sdpa')} returns"
                )
            check_attention(attention, device, arg("attention"), head_dim)

    def resolve(self, mapping: Mapping | None = None) -> ResolvedPipeline:
        """Fill defaults and validate; raises ConfigError/CheckpointError with actionable text.
        mapping: this process's place in its group where the caller has it (see resolve_rank)."""
        return self.resolve_rank(mapping)[0]

    def resolve_rank(self, mapping: Mapping | None = None) -> tuple[ResolvedPipeline, Mapping]:
        """resolve(), and this process's place in its group: `mapping` where the caller has it (a
        spawned rank's; its world size is the run's, checked against world_size=), else read from the
        launcher's environment here, the one read of a process that passes it on."""
        from ropesp import limits

        self.video.check()
        limits.check_positive(latent_frames=self.latent_frames)
        self.parallel.check()
        timeout = self.collective_timeout_s
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"--collective-timeout {timeout} must be > 0 seconds")
        source, video, compute = self.source, self.video, self.compute
        manifest = None
        if source.engines:
            from ropesp.export.manifest import Manifest  # stdlib-only reader

            manifest = Manifest.load(source.engines)
        # with engines, device and dtype default to what they were built for
        device = compute.device or (manifest.device if manifest else None)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"{arg('device', device)}; choose cuda or cpu")
        dtype = dtype_name(compute.dtype or (manifest.dtype if manifest else None), device)
        backend = compute.backend or (manifest.backend_for_runtime() if manifest else "eager")
        if backend not in BACKENDS:
            raise ConfigError(f"{arg('backend', backend)}; choose one of {BACKENDS}")
        if backend not in MODEL_BACKENDS and manifest is None:
            raise ConfigError(
                f"{arg('backend', backend)} needs {arg('engines')} (a directory from `ropesp build`)"
            )
        if backend in MODEL_BACKENDS and manifest is not None:
            raise ConfigError(
                f"{arg('backend', backend)} runs the PyTorch model, not engines: drop {arg('engines')}, or use "
                f"{arg('backend', manifest.backend_for_runtime())} for {source.engines}"
            )
        if manifest is not None:
            cfg, g = manifest.model_config(), manifest.geometry
            defaults = PresetDefaults(g["latent_height"], g["latent_width"], manifest.max_frames)
        else:
            from ropesp.model.checkpoint import resolve_model

            cfg, defaults = resolve_model(source, DEFAULT_PRESET)
        geometry = video.geometry(defaults, cfg.patch_size)
        if cfg.pos_grid is not None and (geometry.rows, geometry.cols) != tuple(cfg.pos_grid):
            _, ph, pw = cfg.patch_size
            raise ConfigError(
                f"the model's position embedding is for a {cfg.pos_grid[0] * ph} x {cfg.pos_grid[1] * pw} "
                f"latent grid; drop --latent-height/--latent-width ({geometry.latent_height} x "
                f"{geometry.latent_width}) or give those sizes"
            )
        frames = self.latent_frames or defaults.latent_frames
        chunks = self.sampler.chunk_sizes(frames)
        local_attn, sink = video.local_attn_frames, video.sink_frames
        if manifest is not None and local_attn == -1 and not sink:  # the engines' rolling window
            local_attn, sink = manifest.local_attn_frames, manifest.sink_frames
        cache = CacheConfig(video.max_frames or frames, local_attn, sink)
        cache.check_chunk(max(chunks))
        if not cache.rolling and frames > cache.max_frames:
            raise ConfigError(
                f"{frames} latent frames exceed the KV cache of {cache.max_frames} frames; raise "
                f"{arg('max_frames')} or use a rolling window ({arg('local_attn_frames')}/{arg('sink_frames')})"
            )
        parallel = self.parallel
        mapping = _rank_mapping(parallel.world_size, manifest, mapping)
        world = mapping.world_size
        if manifest is not None:
            manifest.check_world_size(world)  # before any rank starts
        limits.check_rank_count(world, min(chunks) * geometry.frame_tokens)
        layout = SPLayout.choose(cfg.num_heads, world, parallel.ulysses_degree, parallel.ring_degree)
        from ropesp.plugins.attention_8bit import kv_cache_class

        # the cache the attention mode reads (e4m3 for --attention fp8: plugins/e4m3_cache.py)
        itemsize = (kv_cache_class(self.compute.attention).storage_dtype or DTYPES[dtype]).itemsize
        limits.check_cache_fits(cfg, geometry.frame_tokens, cache, itemsize, world, device)
        self.check_precision(backend, device, dtype, layout, cfg.dim // cfg.num_heads)
        resolved = ResolvedPipeline(
            self,
            cfg,
            geometry,
            frames,
            cache,
            device,
            DTYPES[dtype],
            backend,
            world,
            manifest is None and not source.checkpoint,
            manifest,
            layout,
        )
        return resolved, mapping


def _rank_mapping(requested: int | None, manifest, mapping: Mapping | None) -> Mapping:
    """This process's Mapping: the caller's (checked against world_size=), else the launcher's
    environment with engines defaulting to the world size they were built for."""
    if mapping is not None:
        if requested is not None and requested != mapping.world_size:
            raise ConfigError(
                f"{arg('world_size', requested)} disagrees with this rank's group of {mapping.world_size}"
            )
        return mapping
    if requested is None and manifest is not None and "WORLD_SIZE" not in os.environ:
        requested = manifest.world_size
    return Mapping.from_env(requested)


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


def load_model(
    source: ModelSource,
    model: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    *,
    precision: str = "bf16",
    manifest=None,
):
    """The eager model `model` on device in dtype: the engines' weights (source.engines, e.g. for the
    eager baselines of `ropesp bench`; `manifest`: their manifest where the caller has read it),
    checkpoint weights, or the preset's seeded random ones; with an FP8 precision (fp8, fp8-ffn) its
    block Linears quantized once, here."""
    if manifest is None and source.engines:
        from ropesp.export.manifest import Manifest  # stdlib-only reader

        manifest = Manifest.load(source.engines)
    if manifest is not None:
        from ropesp.runtime.engine import load_weights

        loaded = load_weights(manifest, device)
    else:
        from ropesp.model.checkpoint import load_source

        loaded = load_source(source, model, dtype, device)
    if precision != "bf16":
        from ropesp.plugins.fp8 import apply_fp8

        apply_fp8(loaded, precision=precision)
    return loaded


def make_state(
    res: ResolvedPipeline,
    mapping: Mapping,
    device: torch.device,
    *,
    comm=None,
    parallel: ParallelConfig | None = None,
):
    """The SP state (cache, collectives, RoPE tables) of this rank; parallel replaces the request's SP
    modes (sp_rope, sp_comm); comm: this rank's collectives (runtime/sp.py; default: over the default
    group)."""
    from ropesp.runtime.runners import SPState

    req = res.request
    parallel = parallel or req.parallel
    layout = res.layout if mapping.world_size == res.layout.world_size else SPLayout(1, 1)
    return SPState(
        res.model,
        res.geometry,
        res.cache,
        mapping,
        device,
        res.dtype,
        sp_rope=parallel.sp_rope,
        sp_comm=parallel.sp_comm,
        comm=comm,
        layout=layout,
        chunk_frames=req.sampler.chunk_sizes(res.latent_frames),
        attention=req.compute.attention,
    )


def resolved_model(res: ResolvedPipeline, device: torch.device):
    """load_model for a resolved pipeline: its model source, architecture, dtype, precision and the
    manifest it has read (the adapter, as make_state is SPState's)."""
    req = res.request
    return load_model(
        req.source, res.model, res.dtype, device, precision=req.compute.precision, manifest=res.manifest
    )


def build_executor(res: ResolvedPipeline, mapping: Mapping, comm=None):
    """The executor of this rank for the resolved backend (comm: as make_state's)."""
    from ropesp.runtime.dist import device_for
    from ropesp.runtime.executor import EagerExecutor, warm_device_libraries

    req = res.request
    device = device_for(mapping, res.device)
    state = make_state(res, mapping, device, comm=comm)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # the device's libraries load while the weights do (warm_device_libraries)
        warm = pool.submit(
            warm_device_libraries,
            device,
            res.dtype,
            res.model.num_heads,
            res.model.dim // res.model.num_heads,
        )
        if res.backend in MODEL_BACKENDS:
            compiled = res.backend == "compile"
            executor = EagerExecutor(
                resolved_model(res, device), state, compile=compiled, cuda_graphs=compiled and req.cuda_graphs
            )
        else:
            from ropesp.runtime.engine import load_engine_executor

            executor = load_engine_executor(
                res.manifest,
                state,
                mapping,
                backend=res.backend,
                parallel=req.parallel,
                chunk_frames=req.sampler.chunk_sizes(res.latent_frames),
                cuda_graphs=req.cuda_graphs,
            )
        warm.result()
    return executor


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
        res, mapping = res.resolve_rank(mapping)  # the environment read once, there
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
