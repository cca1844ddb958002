"""`ropesp build`: trace the DiT's segments per rank and compile them for one backend.

    DIR/manifest.json                    ropesp/manifest.py
    DIR/weights.safetensors              the state dict in the build dtype (segments take weights as inputs)
    DIR/rank{r}/{embed,pre,post,head}.onnx|.pt2|.engine    (tensorrt keeps its .onnx beside the .engine)
    DIR/build.log                        per-segment timings and polygraphy summaries (not an artifact)

Only `pre` differs between ranks (export/segments.py): the other segments are built once and copied.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ropesp import dtypes
from ropesp import manifest as mf
from ropesp.config import CacheConfig, VideoGeometry
from ropesp.demo import with_default_weights
from ropesp.errors import ConfigError, EngineError, arg
from ropesp.export.segments import SEGMENTS, make_segments
from ropesp.limits import check_rank_count
from ropesp.model.checkpoint import load_source, resolve_model
from ropesp.output_paths import output_dir_problem
from ropesp.parallel import SPLayout, TokenShard
from ropesp.settings import (
    BUILD_BACKENDS,
    BUILD_SECTIONS,
    ComputeConfig,
    ModelSource,
    ParallelConfig,
    RunConfig,
    SamplerConfig,
    VideoConfig,
)

BUILD_LOG = "build.log"


@dataclass(frozen=True)
class BuildConfig:
    """What `ropesp build` builds: the run's shared sections (BUILD_SECTIONS: the model, the video size
    and KV cache window, the chunking, the world size, dtype and device) and the build's own options."""

    out: str
    """Engine directory to write: new or empty (or, with `overwrite`, holding only a previous build)."""
    backend: str
    """onnx | tensorrt | aoti."""
    source: ModelSource = dataclasses.field(default_factory=ModelSource)
    """A checkpoint (optionally with its model config) or a preset; none of them: the shipped demo weights
    (refused where they are not installed)."""
    video: VideoConfig = dataclasses.field(default_factory=VideoConfig)
    """Default latent size (else the preset's) and cache: the video's length (frames / max_frames) is the
    default video length and KV cache capacity (else the preset's), the rolling window the runtime's
    default."""
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    """chunk_frames, and independent_first_frame: also build the 1-frame first chunk."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """world_size: the ranks P the engines are built for (None: 1). Every Ulysses x ring layout of P
    runs on them; a given degree is checked against the heads here."""
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    """dtype (default: bfloat16 on cuda, float32 on cpu) and device (where the engines run; default:
    cuda for tensorrt, else cpu)."""
    autotune: bool = False
    """AOTInductor max-autotune on CUDA (slower build); never on the CPU."""
    overwrite: bool = False
    """Replace the previous ropesp build in `out` (only the files its manifest lists)."""

    @classmethod
    def of(cls, out: str, backend: str, *, autotune: bool = False, overwrite: bool = False, **settings: Any):
        """A BuildConfig from settings by name (preset="tiny", world_size=2, ...); a setting a build does
        not take is refused by name."""
        allowed = {n for names in BUILD_SECTIONS.values() for n in names}
        extra = sorted(set(settings) - allowed)
        if extra:
            raise ConfigError(f"`ropesp build` does not take {', '.join(arg(n) for n in extra)}")
        run = RunConfig.of(**settings)
        parts = {part: getattr(run, part) for part in BUILD_SECTIONS}
        return cls(out, backend, **parts, autotune=autotune, overwrite=overwrite)

    def __post_init__(self) -> None:
        if self.backend not in BUILD_BACKENDS:
            raise ConfigError(f"{arg('backend', self.backend)}: choose one of {', '.join(BUILD_BACKENDS)}")
        if self.parallel.world_size is None:
            object.__setattr__(self, "parallel", dataclasses.replace(self.parallel, world_size=1))
        device = self.compute.device
        if self.backend == "tensorrt" and device == "cpu":
            raise ConfigError(
                f"{arg('backend', 'tensorrt')} builds CUDA engines; {arg('device', 'cpu')} is not possible"
            )
        if self.backend == "onnx" and device == "cuda":
            raise ConfigError(
                f"{arg('backend', 'onnx')} graphs run in ONNX Runtime on the CPU (`generate --backend ort`); "
                "for CUDA engines build --backend tensorrt or aoti"
            )
        source, video = self.source, self.video
        if source.engines is not None:
            raise ConfigError(
                "`ropesp build` writes engines: give --checkpoint PATH or --preset NAME, not --engines"
            )
        source = with_default_weights(source)
        object.__setattr__(self, "source", source)
        if source.checkpoint is None and source.preset is None and source.model_config is None:
            raise ConfigError(
                f"give {arg('checkpoint')} PATH (optionally {arg('model_config')}) or {arg('preset')} NAME"
            )
        if video.unbounded:
            raise ConfigError(
                f"{arg('frames', 0)}: a build records a default video length; give one, or a rolling window"
            )
        if (video.max_frames is not None or video.length) and video.local_attn_frames != -1:
            raise ConfigError(
                f"give either the video's length ({arg('frames')}/{arg('max_frames')}) or a rolling window "
                f"({arg('local_attn_frames')}/{arg('sink_frames')}), not both"
            )
        dtypes.dtype_name(self.compute.dtype, self.run_device, given=self.compute.dtype)

    @property
    def chunk_frames(self) -> int:
        return self.sampler.chunk_frames

    @property
    def run_device(self) -> str:
        if self.backend == "tensorrt":
            return "cuda"
        return "cpu" if self.backend == "onnx" else (self.compute.device or "cpu")

    @property
    def dtype_name(self) -> str:
        return dtypes.dtype_name(self.compute.dtype, self.run_device)


def _prepare_out(out: Path, overwrite: bool) -> bool:
    """Make out ready for a build: create it, accept it empty, or (overwrite) remove the previous ropesp
    build in it. Returns whether out was created. Refuses (ConfigError) anything else; never deletes a
    file no build wrote: only what a valid manifest lists, the manifest itself and the build log."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a new or empty directory")
    if problem := output_dir_problem(out):
        raise ConfigError(problem)
    if not out.exists():
        out.mkdir(parents=True)
        return True
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
            _remove_partial(Path(cfg.out), cfg.parallel.world_size, prepared["created"])
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
    model_cfg, defaults = resolve_model(cfg.source)
    world, video = cfg.parallel.world_size, cfg.video
    # segments hold all heads of a rank's tokens, so every Ulysses x ring layout of this world size
    # runs on the same engines; choose() refuses a layout the heads cannot take
    SPLayout.choose(model_cfg.num_heads, world, cfg.parallel.ulysses_degree, cfg.parallel.ring_degree)
    lh, lw = video.latent_size
    geometry = VideoGeometry(lh or defaults.latent_height, lw or defaults.latent_width, model_cfg.patch_size)
    cache = CacheConfig(
        video.max_frames or video.length or defaults.latent_frames, video.local_attn_frames, video.sink_frames
    )
    sampler = cfg.sampler
    shapes = [sampler.chunk_frames] + (
        [1] if sampler.independent_first_frame and sampler.chunk_frames != 1 else []
    )
    check_rank_count(world, min(shapes) * geometry.frame_tokens)
    try:
        sampler.chunk_sizes(cache.max_frames)  # the default video must tile into chunks
    except ConfigError as exc:
        raise ConfigError(
            f"{arg('max_frames', cache.max_frames)} (the default video length): {exc}"
        ) from None
    cache.check_chunk(max(shapes))
    run_device = torch.device(cfg.run_device)
    if run_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{arg('backend', cfg.backend)} on cuda needs a CUDA GPU, and none is visible")
    out = Path(cfg.out)
    prepared["created"] = _prepare_out(out, cfg.overwrite)
    model = load_source(cfg.source, model_cfg, dtypes.DTYPES[cfg.dtype_name], run_device)
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
        world_size=world,
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
        f"built {cfg.backend} engines for world size {world} in {manifest.build_seconds:.1f} s: {out}",
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
    world = cfg.parallel.world_size
    total = world * len(shapes) * len(SEGMENTS)
    with open(out / BUILD_LOG, "w") as log, tqdm(total=total, unit="segment", file=sys.stderr) as bar:
        if cxx is not None:
            log.write(f"C++ compiler: {cxx}\n")
        for rank in range(world):
            rank_dir = out / f"rank{rank}"
            rank_dir.mkdir()
            files, first, local = {}, {}, {}
            for frames in shapes:
                shard = TokenShard.split(frames * geometry.frame_tokens, world, rank)
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
