"""`ropesp build`: trace the DiT's segments per rank and compile them for one backend.

    DIR/manifest.json                    export/manifest.py
    DIR/weights.safetensors              the state dict in the build dtype (segments take weights as inputs)
    DIR/rank{r}/{embed,pre,post,head}.onnx|.pt2|.engine    (tensorrt keeps its .onnx beside the .engine)
    DIR/build.log                        per-segment timings and polygraphy summaries (not an artifact)

Only `pre` differs between ranks (export/segments.py): the other segments are built once and copied.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ropesp import dtypes
from ropesp.config import (
    PRESETS,
    CacheConfig,
    ModelConfig,
    PresetDefaults,
    SamplerConfig,
    VideoGeometry,
    preset,
)
from ropesp.errors import ConfigError, EngineError
from ropesp.export import manifest as mf
from ropesp.export.segments import SEGMENTS, make_segments
from ropesp.limits import check_positive, check_rank_count
from ropesp.parallel import SPLayout, TokenShard

BACKENDS = ("onnx", "tensorrt", "aoti")
BUILD_LOG = "build.log"


@dataclass(frozen=True)
class BuildConfig:
    """What `ropesp build` builds."""

    out: str
    """Engine directory to write: new or empty (or, with `overwrite`, holding only a previous build)."""
    backend: str
    """onnx | tensorrt | aoti."""
    world_size: int = 1
    """Sequence-parallel ranks P (must divide the heads)."""
    checkpoint: str | None = None
    """Self-Forcing .pt, Wan safetensors or diffusers dir; None: the preset's seeded random weights."""
    model_config: str | None = None
    """Wan config.json (else beside the checkpoint, else the preset / matching shapes)."""
    preset: str | None = None
    """Named preset (tiny, wan2.1-1.3b, wan2.1-14b)."""
    latent_height: int | None = None
    """Latent height (default: the preset's)."""
    latent_width: int | None = None
    """Latent width (default: the preset's)."""
    chunk_frames: int = 3
    """Latent frames per chunk."""
    independent_first_frame: bool = False
    """Also build the 1-frame first chunk."""
    max_frames: int | None = None
    """Default video length / KV cache capacity in latent frames (default: the preset's video)."""
    local_attn_frames: int = -1
    """Rolling window in frames, sink included (-1: global attention); the runtime's default."""
    sink_frames: int = 0
    """Frames never evicted from the rolling window."""
    dtype: str | None = None
    """float32 | bfloat16 | float16 (default: bfloat16 on cuda, float32 on cpu)."""
    device: str | None = None
    """cpu | cuda: where the engines run (default: cuda for tensorrt, else cpu)."""
    autotune: bool = False
    """AOTInductor max-autotune on CUDA (slower build); never on the CPU."""
    overwrite: bool = False
    """Replace the previous ropesp build in `out` (only the files its manifest lists)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}; choose one of {BACKENDS}")
        check_positive(
            world_size=self.world_size,
            latent_height=self.latent_height,
            latent_width=self.latent_width,
            max_frames=self.max_frames,
        )
        if self.chunk_frames < 1:
            raise ConfigError(f"--chunk-frames {self.chunk_frames} must be >= 1")
        if self.device not in (None, "cpu", "cuda"):
            raise ConfigError(f"--device {self.device!r}; choose cpu or cuda")
        if self.backend == "tensorrt" and self.device == "cpu":
            raise ConfigError("--backend tensorrt builds CUDA engines; --device cpu is not possible")
        if self.backend == "onnx" and self.device == "cuda":
            raise ConfigError(
                "--backend onnx graphs run in ONNX Runtime on the CPU (`generate --backend ort`); "
                "for CUDA engines build --backend tensorrt or aoti"
            )
        if self.checkpoint is None and self.preset is None and self.model_config is None:
            raise ConfigError("give --checkpoint PATH (optionally --model-config) or --preset NAME")
        if self.max_frames is not None and self.local_attn_frames != -1:
            raise ConfigError("give either --max-frames or --local-attn-frames/--sink-frames, not both")
        dtypes.dtype_name(self.dtype, self.run_device)

    @property
    def run_device(self) -> str:
        if self.backend == "tensorrt":
            return "cuda"
        return "cpu" if self.backend == "onnx" else (self.device or "cpu")

    @property
    def dtype_name(self) -> str:
        return dtypes.dtype_name(self.dtype, self.run_device)


def resolve_model(cfg: BuildConfig) -> tuple[ModelConfig, PresetDefaults]:
    """(model config, preset defaults) of the build."""
    if cfg.checkpoint:
        from ropesp.model.checkpoint import peek_config

        model_cfg = peek_config(cfg.checkpoint, cfg.model_config, cfg.preset)
    elif cfg.model_config:
        model_cfg = ModelConfig.from_json(cfg.model_config)
    else:
        model_cfg = preset(cfg.preset)[0]
    names = [n for n, (make, _) in PRESETS.items() if make() == model_cfg]
    return model_cfg, preset(cfg.preset or (names[0] if names else "wan2.1-1.3b"))[1]


def load_weights(cfg: BuildConfig, model_cfg: ModelConfig, device: torch.device):
    """The eager model in the build dtype: checkpoint weights, or the preset's seeded random ones (drawn on
    the device the engines run on by the runtime's own recipe, model.wan.random_model)."""
    from ropesp.model.wan import random_model

    dtype = dtypes.DTYPES[cfg.dtype_name]
    if cfg.checkpoint:
        from ropesp.model.checkpoint import load_model

        return load_model(
            cfg.checkpoint, model_cfg, model_config_path=cfg.model_config, dtype=dtype, device=device
        )[0]
    return random_model(model_cfg, dtype, device)


def _prepare_out(out: Path, overwrite: bool) -> bool:
    """Make out ready for a build: create it, accept it empty, or (overwrite) remove the previous ropesp
    build in it. Returns whether out was created. Refuses (ConfigError) anything else; never deletes a
    file no build wrote: only what a valid manifest lists, the manifest itself and the build log."""
    if not out.exists():
        out.mkdir(parents=True)
        return True
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a new or empty directory")
    if not any(out.iterdir()):
        return False
    try:
        previous = mf.Manifest.load(out)
    except EngineError:
        raise ConfigError(
            f"--out {out} is not empty and holds no valid ropesp build (manifest.json); choose a new or "
            "empty directory"
        ) from None
    if not overwrite:
        raise ConfigError(
            f"--out {out} holds a previous ropesp build; pass --overwrite to replace it, or choose a new "
            "or empty directory"
        )
    owned = {*previous.files, mf.MANIFEST, BUILD_LOG}
    owned_dirs = {p for rel in owned for p in Path(rel).parents if p != Path(".")}
    doomed, strays = [], []
    for dirpath, dirnames, filenames in os.walk(out):  # symlinks are not followed: listed as entries
        base = Path(dirpath).relative_to(out)
        for name in dirnames + filenames:
            rel, path = base / name, Path(dirpath) / name
            is_dir = path.is_dir() and not path.is_symlink()
            if (rel in owned_dirs) if is_dir else (rel.as_posix() in owned):
                doomed.append((path, is_dir))
            else:
                strays.append(rel.as_posix())
    if strays:
        raise ConfigError(
            f"--out {out} holds files that no ropesp build wrote ({', '.join(sorted(strays)[:3])}); "
            "--overwrite replaces only a directory holding nothing but a previous build: move them or "
            "choose another directory"
        )
    for path, is_dir in reversed(doomed):  # os.walk is top-down: files and subdirectories first
        path.rmdir() if is_dir else path.unlink()
    return False


def _remove_partial(out: Path, world_size: int, created: bool) -> None:
    """Remove what a failed build wrote into out (which was empty when it started)."""
    for name in (mf.MANIFEST, mf.WEIGHTS, BUILD_LOG):
        (out / name).unlink(missing_ok=True)
    for rank in range(world_size):
        shutil.rmtree(out / f"rank{rank}", ignore_errors=True)
    if created and not any(out.iterdir()):
        out.rmdir()


def build(cfg: BuildConfig) -> Path:
    """Build the engine directory cfg.out; returns it. Progress per segment on stderr (tqdm).

    A build that fails (or is interrupted) removes what it wrote, and out if it created it."""
    prepared: dict = {}
    try:
        return _build(cfg, prepared)
    except BaseException:
        if prepared:
            _remove_partial(Path(cfg.out), cfg.world_size, prepared["created"])
        raise


def _build(cfg: BuildConfig, prepared: dict) -> Path:
    """build(); sets prepared["created"] once out is ready to be written."""
    from safetensors.torch import save_file

    t_start = time.perf_counter()
    if cfg.backend == "tensorrt":
        from ropesp.export import tensorrt as trt_build

        trt_build.require()  # fail before any work
    cxx = None
    if cfg.backend == "aoti":
        from ropesp.export.toolchain import choose_cxx

        cxx = choose_cxx()  # before any work; BuildError names every compiler it refused
    model_cfg, defaults = resolve_model(cfg)
    # segments hold all heads of a rank's tokens, so every Ulysses x ring layout of this world size
    # runs on the same engines; choose() refuses a layout the heads cannot take
    SPLayout.choose(model_cfg.num_heads, cfg.world_size)
    geometry = VideoGeometry(
        cfg.latent_height or defaults.latent_height,
        cfg.latent_width or defaults.latent_width,
        model_cfg.patch_size,
    )
    cache = CacheConfig(cfg.max_frames or defaults.latent_frames, cfg.local_attn_frames, cfg.sink_frames)
    shapes = [cfg.chunk_frames] + ([1] if cfg.independent_first_frame and cfg.chunk_frames != 1 else [])
    check_rank_count(cfg.world_size, min(shapes) * geometry.frame_tokens)
    sampler = SamplerConfig(
        chunk_frames=cfg.chunk_frames, independent_first_frame=cfg.independent_first_frame
    )
    try:
        sampler.chunk_sizes(cache.max_frames)  # the default video must tile into chunks
    except ConfigError as exc:
        raise ConfigError(f"--max-frames {cache.max_frames} (the default video length): {exc}") from None
    if cache.rolling and cache.local_attn_frames < cache.sink_frames + max(shapes):
        raise ConfigError(
            f"--local-attn-frames {cache.local_attn_frames} must be >= --sink-frames {cache.sink_frames} "
            f"+ chunk frames {max(shapes)}"
        )
    run_device = torch.device(cfg.run_device)
    if run_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--backend {cfg.backend} on cuda needs a CUDA GPU, and none is visible")
    out = Path(cfg.out)
    prepared["created"] = _prepare_out(out, cfg.overwrite)
    model = load_weights(cfg, model_cfg, run_device)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / mf.WEIGHTS)
    )
    trace_device = run_device if cfg.backend == "aoti" else torch.device("cpu")  # ONNX: traced on the CPU
    specs, ranks = _build_ranks(cfg, model.to(trace_device), geometry, shapes, out, trace_device, cxx)
    del model

    artifacts = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in (mf.MANIFEST, BUILD_LOG))
    env = mf.runtime_environment(cfg.run_device, cfg.backend)
    versions = {k: env[k] for k in ("torch", "cuda", "ropesp", "tensorrt")}
    if cfg.backend in ("onnx", "tensorrt"):
        import onnx

        versions["onnx"] = onnx.__version__
    manifest = mf.Manifest(
        backend=cfg.backend,
        model=model_cfg.to_dict(),
        world_size=cfg.world_size,
        dtype=cfg.dtype_name,
        device=cfg.run_device,
        chunk_frames=cfg.chunk_frames,
        frame_shapes=shapes,
        geometry={
            "latent_height": geometry.latent_height,
            "latent_width": geometry.latent_width,
            "rows": geometry.rows,
            "cols": geometry.cols,
            "frame_tokens": geometry.frame_tokens,
        },
        max_frames=cache.max_frames,
        local_attn_frames=cache.local_attn_frames,
        sink_frames=cache.sink_frames,
        versions=versions,
        gpu_arch=env["gpu_arch"],
        segments=specs,
        ranks=ranks,
        files={p.relative_to(out).as_posix(): mf.file_digest(p) for p in artifacts},
        build_seconds=round(time.perf_counter() - t_start, 2),
    )
    manifest.save(out)
    print(
        f"built {cfg.backend} engines for world size {cfg.world_size} in {manifest.build_seconds:.1f} s: {out}",
        file=sys.stderr,
    )
    return out


def _build_ranks(
    cfg: BuildConfig, model, geometry, shapes: list[int], out: Path, device: torch.device, cxx: str | None
):
    """Every rank's segments at every chunk length -> (segment specs, RankFiles per rank); cxx: the C++
    compiler of AOTInductor builds."""
    from tqdm import tqdm

    ext = mf.EXTENSIONS[cfg.backend]
    built: dict[tuple, list[str]] = {}  # static key -> files of the first rank that built it
    specs, ranks = [], []
    total = cfg.world_size * len(shapes) * len(SEGMENTS)
    with open(out / BUILD_LOG, "w") as log, tqdm(total=total, unit="segment", file=sys.stderr) as bar:
        if cxx is not None:
            log.write(f"C++ compiler: {cxx}\n")
        for rank in range(cfg.world_size):
            rank_dir = out / f"rank{rank}"
            rank_dir.mkdir()
            files, first, local = {}, {}, {}
            for frames in shapes:
                shard = TokenShard.split(frames * geometry.frame_tokens, cfg.world_size, rank)
                first[str(frames)], local[str(frames)] = shard.first, shard.length
                for seg in make_segments(
                    model, geometry, frames, shard, "" if frames == cfg.chunk_frames else f"_f{frames}"
                ):
                    bar.set_description(f"rank {rank} {seg.spec.stem}")
                    t0 = time.perf_counter()
                    if seg.static_key in built:  # the same graph as another rank's: copy it
                        for src in built[seg.static_key]:
                            shutil.copyfile(out / src, rank_dir / Path(src).name)
                        note = "(the same graph as an earlier rank's: copied)"
                    else:
                        written, note = _build_one(cfg, seg, rank_dir, device, cxx)
                        built[seg.static_key] = [p.relative_to(out).as_posix() for p in written]
                    files[seg.spec.stem] = f"rank{rank}/{seg.spec.stem}{ext}"
                    if rank == 0:
                        specs.append(seg.spec)
                    log.write(f"== {files[seg.spec.stem]}: {time.perf_counter() - t0:.1f} s\n{note}\n")
                    bar.update(1)
            ranks.append(mf.RankFiles(rank, files, first, local))
    return specs, ranks


def _build_one(
    cfg: BuildConfig, seg, rank_dir: Path, device: torch.device, cxx: str | None
) -> tuple[list[Path], str]:
    """Compile one segment into rank_dir; returns the files written and a note for the build log."""
    stem = seg.spec.stem
    if cfg.backend == "aoti":
        from ropesp.export.aoti import compile_segment

        path = compile_segment(
            seg.module, seg.example, rank_dir / f"{stem}.pt2", device=device, cxx=cxx, autotune=cfg.autotune
        )
        return [path], f"AOTInductor package for {device.type}"
    from ropesp.export import onnx as onnx_export

    onnx_path = rank_dir / f"{stem}.onnx"
    written = onnx_export.export_segment(seg.module, seg.example, seg.spec, onnx_path)
    onnx_export.check(onnx_path)
    note = onnx_export.summary(onnx_path)
    if cfg.backend == "tensorrt":
        from ropesp.export import tensorrt as trt_build

        written.append(trt_build.build_engine(onnx_path, rank_dir / f"{stem}.engine", seg.spec))
    return written, note
