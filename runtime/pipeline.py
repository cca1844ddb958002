"""From settings to a ready rank: `resolve` checks a RunConfig and fills every default; the builders make
this rank's executor (the model or its engines, the KV cache slots, the collectives) and sessions.

    res = resolve(RunConfig.of(preset="tiny"))      # ConfigError / CheckpointError before any work
    session = build_session(res)                    # one rank: a StreamSession on its executor

`resolve` validates everything that can be checked without a process group, so the engine core
(runtime/engine_core.py) refuses bad input once, before it starts any rank.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ropesp import limits
from ropesp.config import CacheConfig, ModelConfig, PresetDefaults, VideoGeometry
from ropesp.dtypes import DTYPES, dtype_name
from ropesp.errors import CheckpointError, ConfigError, arg
from ropesp.parallel import SPLayout
from ropesp.runtime.dist import Mapping
from ropesp.runtime.session import StreamSession
from ropesp.settings import MODEL_BACKENDS, RANDOM_WEIGHTS, ModelSource, ParallelConfig, RunConfig

DEFAULT_PRESET = "tiny"
"""The model of a run that names none where the embedded demo weights are absent (a bare source tree)."""
COLLECTIVE_TIMEOUT_S = 60.0
"""Default bound on a streaming collective's wait for the other ranks (interactive use)."""
COMPILE_COLLECTIVE_TIMEOUT_S = 300.0
"""With the compile backend: its graphs compile during the first chunks, at a pace that differs
between ranks."""
MAX_STREAMS_AUTO = 4
"""The most KV cache slots an engine allocates when max_streams is not given."""
FREE_MEMORY_SHARE = 0.5
"""The share of the device's free memory (after the weights) an automatic slot count may take."""


@dataclass(frozen=True)
class ResolvedPipeline:
    """A validated RunConfig with every default filled in."""

    config: RunConfig
    """The settings as given, with the model source made concrete (demo default, --model-dir's DiT)."""
    model: ModelConfig
    geometry: VideoGeometry
    latent_frames: int
    """The default video length in latent frames (a request may ask for another that fits the cache)."""
    unbounded: bool
    """The settings asked for a stream until stopped (frames 0)."""
    cache: CacheConfig
    device: str
    dtype: torch.dtype
    backend: str
    world_size: int
    random_weights: bool
    manifest: object | None
    """The engines' ropesp.manifest.Manifest, or None."""
    layout: SPLayout
    model_dir: object | None = None
    """The resolved --model-dir (ropesp.model_dir.ModelDir), or None."""
    max_streams: int = 1
    """KV cache slots of the engine: the streams it serves at once."""
    decoder: str = "preview"
    """preview | vae | taehv | none (the settings' default filled in)."""
    vae: str | None = None
    """The Wan VAE's path for the vae decoder (--vae, else --model-dir's)."""
    taehv: str | None = None
    """The tiny decoder's weights for the taehv decoder (--taehv: a taew2_1 file, or random)."""

    @property
    def cache_itemsize(self) -> int:
        """Bytes per element of the self-attention KV cache the attention mode reads."""
        return cache_itemsize(self.config.compute.attention, self.dtype)

    @property
    def collective_timeout_s(self) -> float:
        """Seconds a streaming collective waits for the other ranks."""
        given = self.config.parallel.collective_timeout
        if given is not None:
            return given
        return COMPILE_COLLECTIVE_TIMEOUT_S if self.backend == "compile" else COLLECTIVE_TIMEOUT_S

    def chunk_sizes(self, latent_frames: int | None = None) -> list[int]:
        """Latent frames per chunk of a video of latent_frames (default: the resolved length)."""
        return self.config.sampler.chunk_sizes(latent_frames or self.latent_frames)


def check_precision(
    config: RunConfig, backend: str, device: str, dtype: str, layout: SPLayout, head_dim: int | None = None
) -> None:
    """Refuse precision / attention where they cannot run (head_dim: the model's), naming the setting
    and the reason."""
    from ropesp.plugins.attention_8bit import check_attention
    from ropesp.plugins.fp8 import check_fp8

    precision, attention = config.compute.precision, config.compute.attention
    if precision != "bf16":
        if backend not in MODEL_BACKENDS:
            raise ConfigError(
                f"{arg('precision', precision)} quantizes the PyTorch model at load: use "
                f"{arg('backend', 'eager')} or compile (the {backend} engines of `ropesp build` run in their "
                "build dtype)"
            )
        check_fp8(device, arg("precision", precision))
        if dtype != "bfloat16":
            raise ConfigError(
                f"{arg('precision', precision)} runs on bfloat16 activations, not {arg('dtype', dtype)}: pass "
                f"{arg('dtype', 'bfloat16')} (the default on CUDA)"
            )
    if attention != "sdpa":
        if layout.ring > 1:
            raise ConfigError(
                f"{arg('attention', attention)} runs with pure Ulysses or one rank; the ring layout {layout} "
                f"merges partial attentions that only {arg('attention', 'sdpa')} returns"
            )
        check_attention(attention, device, arg("attention"), head_dim)


def with_default_model(config: RunConfig) -> RunConfig:
    """The embedded demo model where the settings name no model (ropesp.demo ships its weights)."""
    from ropesp.demo import with_default_weights

    source = with_default_weights(config.source)
    return config if source is config.source else config.replace(checkpoint=source.checkpoint)


def _named(message: str, name: str, given: str, subject: str | None = None) -> str:
    """A loader's message about the path `given` ("checkpoint PATH: ...", or `subject` PATH where the
    loader calls it otherwise) as naming the parameter the caller gave it by (`--checkpoint PATH: ...`)."""
    subject = subject or name
    for spelled in (f"{subject} {given}", f"{subject} {Path(given)}"):
        rest = message[len(spelled) :]
        if message.startswith(spelled) and rest[:1] in ("", ":", " "):  # that path, not a longer one
            return arg(name, given) + rest
    return f"{arg(name, given)}: {message}"


def resolve(
    config: RunConfig, mapping: Mapping | None = None, *, default_model: bool = True
) -> ResolvedPipeline:
    """Fill defaults and validate; raises ConfigError/CheckpointError with actionable text.

    mapping: this process's place in its group where the caller has it (a rank the engine core
    started), else read from the launcher's environment here (torchrun), the one read of a process.
    default_model: a config that names no model runs the embedded demo model (else the `tiny` preset
    on random weights, as `ropesp bench` times it)."""
    return resolve_rank(config, mapping, default_model=default_model)[0]


def resolve_rank(
    config: RunConfig, mapping: Mapping | None = None, *, default_model: bool = True
) -> tuple[ResolvedPipeline, Mapping]:
    """resolve(), and this process's Mapping."""
    if default_model:
        config = with_default_model(config)
    source, video, compute = config.source, config.video, config.compute
    model_dir = None
    if source.model_dir:
        from ropesp.model_dir import resolve_model_dir

        model_dir = resolve_model_dir(source.model_dir, source.checkpoint)
        source = dataclasses.replace(source, checkpoint=str(model_dir.dit_weights), model_dir=None)
    manifest = None
    if source.engines:
        from ropesp.manifest import Manifest

        manifest = Manifest.load(source.engines)
    # with engines, device and dtype default to what they were built for
    device = run_device(compute.device, manifest, torch.cuda.is_available())
    dtype = dtype_name(compute.dtype or (manifest.dtype if manifest else None), device, given=compute.dtype)
    backend = compute.backend or (manifest.backend_for_runtime() if manifest else "eager")
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

        if source.checkpoint and not os.path.exists(source.checkpoint):  # named as the caller wrote it
            raise CheckpointError(f"{arg('checkpoint', source.checkpoint)} does not exist")
        try:
            cfg, defaults = resolve_model(source, DEFAULT_PRESET)
        except CheckpointError as exc:
            if config.source.checkpoint:
                raise CheckpointError(_named(str(exc), "checkpoint", config.source.checkpoint)) from None
            if model_dir is None:
                raise
            raise CheckpointError(f"{arg('model_dir', model_dir.root)} (transformer/): {exc}") from None
    lh, lw = video.latent_size
    geometry = VideoGeometry(lh or defaults.latent_height, lw or defaults.latent_width, cfg.patch_size)
    if cfg.pos_grid is not None and (geometry.rows, geometry.cols) != tuple(cfg.pos_grid):
        _, ph, pw = cfg.patch_size
        h, w = cfg.pos_grid[0] * ph, cfg.pos_grid[1] * pw
        raise ConfigError(
            f"the model's position embedding is for a {h * 8} x {w * 8} video ({h} x {w} latents); drop "
            f"{arg('height')}/{arg('width')} or give those sizes"
        )
    length = video.length
    unbounded = length == 0
    frames = defaults.latent_frames if not length else length
    sampler = config.sampler
    chunks = sampler.chunk_sizes(frames) if not unbounded else [sampler.chunk_size(0), sampler.chunk_size(1)]
    local_attn, sink = video.local_attn_frames, video.sink_frames
    if manifest is not None and local_attn == -1 and not sink:  # the engines' rolling window
        local_attn, sink = manifest.local_attn_frames, manifest.sink_frames
    cache = CacheConfig(video.max_frames or frames, local_attn, sink)
    cache.check_chunk(max(chunks))
    if unbounded and not cache.rolling:
        raise ConfigError(unbounded_needs_window())
    if not cache.rolling and frames > cache.max_frames:
        raise ConfigError(cache_too_small(frames, cache.max_frames))
    mapping = _rank_mapping(config.parallel.world_size, manifest, mapping)
    world = mapping.world_size
    if manifest is not None:
        manifest.check_world_size(world)  # before any rank starts
    limits.check_rank_count(world, min(chunks) * geometry.frame_tokens)
    layout = SPLayout.choose(
        cfg.num_heads, world, config.parallel.ulysses_degree, config.parallel.ring_degree
    )
    itemsize = cache_itemsize(compute.attention, DTYPES[dtype])
    slots = config.streams.max_streams or auto_streams(
        cfg, geometry.frame_tokens, cache, itemsize, world, device
    )
    limits.check_cache_fits(cfg, geometry.frame_tokens, cache, itemsize, world, device, slots)
    check_precision(config, backend, device, dtype, layout, cfg.dim // cfg.num_heads)
    decoder, vae = _decoder(config, model_dir, cfg.out_dim)
    resolved = ResolvedPipeline(
        dataclasses.replace(config, source=source),
        cfg,
        geometry,
        frames,
        unbounded,
        cache,
        device,
        DTYPES[dtype],
        backend,
        world,
        manifest is None and not source.checkpoint,
        manifest,
        layout,
        model_dir,
        slots,
        decoder,
        vae,
        config.decode.taehv if decoder == "taehv" else None,
    )
    return resolved, mapping


def cache_itemsize(attention: str, dtype: torch.dtype) -> int:
    """Bytes per element of the KV cache that attention mode `attention` reads: its storage dtype (e4m3
    for fp8: plugins/e4m3_cache.py), else the activations' dtype."""
    from ropesp.plugins.attention_8bit import kv_cache_class

    return (kv_cache_class(attention).storage_dtype or dtype).itemsize


def auto_streams(
    cfg: ModelConfig, frame_tokens: int, cache: CacheConfig, itemsize: int, world: int, device: str
) -> int:
    """KV cache slots when max_streams is not given: what FREE_MEMORY_SHARE of the memory free now holds
    (a GPU's, or this host's for every CPU rank together), at least 1 and at most MAX_STREAMS_AUTO."""
    per_slot = limits.kv_cache_bytes(cfg, frame_tokens, cache, itemsize, world) * (
        1 if device == "cuda" else world
    )
    free = limits.free_memory_bytes(device)
    if free is None:
        return 1
    return max(1, min(MAX_STREAMS_AUTO, int(free * FREE_MEMORY_SHARE // max(per_slot, 1))))


def _decoder(config: RunConfig, model_dir, latent_channels: int) -> tuple[str, str | None]:
    """(decoder, the Wan VAE's path): taehv where --taehv names the tiny decoder, else vae where --vae or
    --model-dir gives one, unless told otherwise. latent_channels: the model's (out_dim)."""
    settings = config.decode
    vae = settings.vae or (str(model_dir.vae) if model_dir is not None else None)
    decoder = settings.decoder or ("taehv" if settings.taehv else "vae" if vae else "preview")
    if decoder == "taehv":
        check_taehv(settings.taehv, latent_channels)
    if decoder == "vae" and vae is None:
        raise ConfigError(
            f"{arg('decoder', 'vae')} needs a Wan VAE: pass {arg('vae')} (a diffusers vae/ directory or "
            f"Wan2.1_VAE.pth) or {arg('model_dir')}, or use {arg('decoder', 'preview')}"
        )
    if settings.vae:
        check_vae(settings.vae)
    given = [n for n in ("vae_compile", "vae_fast", "vae_cudnn", "decode_device") if getattr(settings, n)]
    if decoder != "vae" and given:
        name = given[0]
        raise ConfigError(f"{arg(name)} acts on the Wan VAE decoder: use {arg('decoder', 'vae')}")
    if settings.decode_device:
        from ropesp.runtime.dist import parse_device

        parse_device(settings.decode_device, arg("decode_device"))
    if decoder == "vae":
        from ropesp.extras import require

        require("vae", f"{arg('decoder', 'vae')} (the Wan VAE)")
        if settings.vae_cudnn:
            require("cudnn", arg("vae_cudnn"))
    return decoder, (vae if decoder == "vae" else None)


def check_vae(vae: str) -> None:
    """The Wan VAE's checkpoint exists, before any rank starts."""
    if not os.path.exists(vae):
        raise ConfigError(f"{arg('vae', vae)} does not exist (a diffusers vae/ directory or Wan2.1_VAE.pth)")


def decoder_error(
    exc: CheckpointError, *, vae: str | None, taehv: str | None, model_dir=None
) -> CheckpointError:
    """make_decoder's CheckpointError as naming the parameter its weights came by: --taehv, --vae or, for
    the VAE of a model directory, --model-dir."""
    if taehv is not None:
        return CheckpointError(_named(str(exc), "taehv", taehv, "TAEHV checkpoint"))
    if vae is not None:
        subject = "VAE directory" if str(exc).startswith("VAE directory ") else "VAE checkpoint"
        return CheckpointError(_named(str(exc), "vae", vae, subject))
    return CheckpointError(f"{arg('model_dir', model_dir)}: {exc}")


def check_taehv(taehv: str, latent_channels: int) -> None:
    """The tiny decoder's weights exist and it can take the model's latents (TAEHV's taew2_1: Wan 2.1's 16
    channels), before any rank starts."""
    from ropesp.decode.taehv import LATENT_CHANNELS

    if taehv != RANDOM_WEIGHTS and not os.path.isfile(taehv):
        what = "is a directory" if os.path.isdir(taehv) else "does not exist"
        raise ConfigError(
            f"{arg('taehv', taehv)} {what}: give the TAEHV project's taew2_1.pth or taew2_1.safetensors "
            f"file, or {arg('taehv', RANDOM_WEIGHTS)}"
        )
    if latent_channels != LATENT_CHANNELS:
        raise ConfigError(
            f"{arg('taehv', taehv)}: the tiny decoder (taew2_1) takes Wan 2.1's {LATENT_CHANNELS} latent "
            f"channels; this model makes {latent_channels} (use {arg('decoder', 'preview')} or none)"
        )


def unbounded_needs_window() -> str:
    return (
        "an unbounded stream needs a rolling window (the KV cache would overflow): set "
        f"{arg('local_attn_frames')} (sink frames included) and {arg('sink_frames')}"
    )


def cache_too_small(frames: int, cache_frames: int) -> str:
    """Why a video of `frames` latent frames does not fit a KV cache of cache_frames, and the ways out."""
    return (
        f"a video of {4 * frames - 3} frames ({frames} latent) exceeds the KV cache of {cache_frames} latent "
        f"frames: raise {arg('max_frames')} to {frames} (or set {arg('frames')} when building the pipeline), "
        f"or stream through a rolling window ({arg('local_attn_frames')}/{arg('sink_frames')})"
    )


def _rank_mapping(requested: int | None, manifest, mapping: Mapping | None) -> Mapping:
    """This process's Mapping: the caller's (checked against world_size), else the launcher's
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


def run_device(given: str | None, manifest, gpus_visible: bool) -> str:
    """The device a run uses: the one given, else its engines' (manifest), else cuda where a GPU is
    visible. gpus_visible is the caller's: resolve asks CUDA, a Triton instance counts GPUs without
    initialising CUDA (serving/instances.py) before it narrows CUDA_VISIBLE_DEVICES."""
    return given or (manifest.device if manifest is not None else None) or ("cuda" if gpus_visible else "cpu")


def stream_decoder(res: ResolvedPipeline, device: torch.device, *, decode: bool = True):
    """Rank 0's stream decoder for this pipeline: the preview or TAEHV's tiny decoder on `device`, or the
    Wan VAE there or on --decode-device (a compiled one warmed up for the pipeline's latent size here,
    before any chunk); None for decoder none (or decode=False). CheckpointError for an unreadable VAE or
    tiny decoder, naming its source."""
    if not decode or res.decoder == "none":
        return None
    from ropesp.decode.factory import WarmUp, make_decoder
    from ropesp.runtime.dist import parse_device

    settings = res.config.decode
    where = parse_device(settings.decode_device, arg("decode_device")) if settings.decode_device else device
    g = res.geometry
    warm = WarmUp(g.latent_height, g.latent_width, res.config.sampler.chunk_frames)
    try:
        return make_decoder(
            res.vae,
            where,
            res.dtype,
            settings.vae_compile,
            warm,
            fast=settings.vae_fast,
            cudnn=settings.vae_cudnn,
            taehv=res.taehv,
        )
    except CheckpointError as exc:
        vae = res.vae if settings.vae else None
        raise decoder_error(exc, vae=vae, taehv=res.taehv, model_dir=res.config.source.model_dir) from None


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
        from ropesp.manifest import Manifest

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
    slots: int | None = None,
    batch: int = 1,
):
    """The SP state (cache slots, collectives, RoPE tables) of this rank; parallel replaces the settings'
    SP modes (sp_rope, sp_comm); comm: this rank's collectives (runtime/sp.py; default: over the default
    group); slots: KV cache slots (default: res.max_streams); batch: streams every forward carries at once,
    each slot's cache [layers, batch, S, H, D] (scripts/batch_bench.py; the runtime's streams are batch 1)."""
    from ropesp.runtime.runners import SPState

    config = res.config
    parallel = parallel or config.parallel
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
        chunk_frames=res.chunk_sizes(),
        attention=config.compute.attention,
        slots=slots or res.max_streams,
        batch=batch,
    )


def resolved_model(res: ResolvedPipeline, device: torch.device):
    """load_model for a resolved pipeline: its model source, architecture, dtype, precision and the
    manifest it has read."""
    return load_model(
        res.config.source,
        res.model,
        res.dtype,
        device,
        precision=res.config.compute.precision,
        manifest=res.manifest,
    )


def build_executor(res: ResolvedPipeline, mapping: Mapping, comm=None, slots: int | None = None):
    """The executor of this rank for the resolved backend (comm: as make_state's; slots: KV cache slots,
    default res.max_streams)."""
    from ropesp.runtime.dist import device_for
    from ropesp.runtime.executor import EagerExecutor, warm_device_libraries

    config = res.config
    device = device_for(mapping, res.device)
    state = make_state(res, mapping, device, comm=comm, slots=slots)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # the device's libraries load while the weights do (warm_device_libraries)
        warm = pool.submit(
            warm_device_libraries,
            device,
            res.dtype,
            res.model.num_heads,
            res.model.dim // res.model.num_heads,
        )
        graphs = config.compute.cuda_graphs
        if res.backend in MODEL_BACKENDS:
            compiled = res.backend == "compile"
            model = resolved_model(res, device)
            executor = EagerExecutor(model, state, compile=compiled, cuda_graphs=compiled and graphs)
        else:
            from ropesp.runtime.engine import load_engine_executor

            executor = load_engine_executor(
                res.manifest,
                state,
                mapping,
                backend=res.backend,
                parallel=config.parallel,
                chunk_frames=res.chunk_sizes(),
                cuda_graphs=graphs,
            )
        warm.result()
    return executor


def _group_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def build_session(
    res: ResolvedPipeline | RunConfig,
    mapping: Mapping | None = None,
    decoder=None,
    comm=None,
    overlap_decode: bool | None = None,
    unbounded: bool | None = None,
) -> StreamSession:
    """A StreamSession of one stream on this rank (the process group must already exist for world
    size > 1: the engine core's ranks, or torchrun's).

    overlap_decode: decode chunk c while the DiT runs chunk c+1 (default: with a decoder on CUDA).
    unbounded: stream until the iterator is closed (default: as the settings ask; needs the rolling
    window). comm: this rank's collectives (runtime/sp.py): tests pass one with a CollectiveLog; bench's
    AloneCollectives run one rank of the group without its peers (no process group)."""
    if isinstance(res, RunConfig):
        res, mapping = resolve_rank(res, mapping)
    mapping = mapping or Mapping.from_env(res.world_size)
    peers = mapping.world_size > 1 and (comm is None or comm.needs_peers)
    if peers and not _group_initialized():
        raise ConfigError(
            f"{arg('world_size', mapping.world_size)} needs its ranks: the engine core starts and owns them "
            "(ropesp.Pipeline, `ropesp generate`); build_session runs one rank of a group that already exists"
        )
    executor = build_executor(res, mapping, comm, slots=1)
    if peers:
        from ropesp.runtime.dist import set_collective_timeout

        set_collective_timeout(res.collective_timeout_s)  # every rank is set up: bound the waits from here on
    unbounded = res.unbounded if unbounded is None else unbounded
    return StreamSession(
        executor,
        res.config.sampler,
        res.geometry,
        None if unbounded else res.latent_frames,
        decoder,
        overlap_decode=overlap_decode,
        early_first_frame=res.config.decode.early_first_frame,
    )
