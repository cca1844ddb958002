"""`ropesp bench`: the optimized path against the baselines, side by side, in ONE run.

Configurations (each after warm-up, timed with synchronized clocks; chunk latencies come from the
session, which synchronizes when a chunk's latents reach the host):
  reference  single rank, eager, RoPE as upstream (float64 complex multiplier per call), no CUDA graphs
  paper-sp   P ranks, eager, AllGather-then-RoPE + three all-to-alls (the paper's baseline)
  optimized  P ranks, eager, Causal-RoPE SP + one fused all-to-all
  optimized-graphs  the same eager model replayed from CUDA graphs (launch overhead removed, no fusion)
  compiled   P ranks, built engines (--engines) + CUDA graphs
  compiled-nograph  the same engines launched one by one (what CUDA graphs save)
  compile    P ranks, regional torch.compile of the model + CUDA graphs (no build step)
  compile-fa3       compile with the self-attention as FlashAttention-3's bf16 forward (--attention fa3)
  compile-fp8       compile with the blocks' Linear layers in FP8 (torchao e4m3, --precision fp8)
  compile-fp8attn   compile-fp8 with the self-attention in FP8 too (FlashAttention-3 e4m3 over the e4m3 KV cache,
                    --attention fp8)
  compile-int8attn  compile-fp8 with SageAttention's INT8 attention (--attention int8)
  compile-fp8ffn    compile with the FFN's Linear layers alone in FP8 (--precision fp8-ffn)
  compile-fp8ffnattn  compile-fp8ffn with the self-attention in FP8 (--precision fp8-ffn --attention fp8)
With --alone, one process runs rank 0 of the P-rank configurations by itself on one GPU: its collectives
keep their shapes and move no data (runtime/sp.py AloneCollectives), so it times one rank's compute at
world size P, on wrong data (max|d| is meaningless there): the scaling P ranks would reach if their
communication were free. Beside a real P-rank run on the same GPU kind, the difference is what the
collectives (and waiting for the slowest rank) cost.
Every configuration's latents are compared with the first configuration's (same seed, same weights):
`latents_vs` in the JSON, max|d| in the table. Metrics: time to the first chunk's latents and to its first decoded frame (with
--early-first-frame, handed over before the rest of the chunk is decoded), per-chunk latency,
FPS for the whole video (DiT only, and with decode: rank 0 decodes, as in `generate` and serving,
serially and overlapped with the DiT), peak device memory per rank, share of time in
collectives, achieved matrix TFLOP/s per GPU (ropesp/flops.py: the video's GEMM + attention FLOPs over its
time), and cold start (session build, first forward). Collective time is taken with events
around each call, so a CUDA-graph replay (compile, compiled) reports none: its share reads 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ropesp.decode import video_frames_for
from ropesp.decode.factory import RANDOM_VAE, WarmUp, check_wan_vae_options, make_decoder
from ropesp.errors import CheckpointError, ConfigError
from ropesp.output_paths import write_report
from ropesp.runtime.dist import Mapping, device_for, parse_device
from ropesp.runtime.pipeline import (
    ResolvedPipeline,
    build_executor,
    check_taehv,
    check_vae,
    decoder_error,
    make_state,
    resolve,
    resolved_model,
)
from ropesp.runtime.session import StreamSession
from ropesp.runtime.sp import AloneCollectives, CollectiveLog, Collectives
from ropesp.settings import RunConfig

CONFIGS = (
    "reference",
    "paper-sp",
    "optimized",
    "optimized-graphs",
    "compile",
    "compile-fa3",
    "compile-fp8",
    "compile-fp8attn",
    "compile-fp8ffn",
    "compile-fp8ffnattn",
    "compile-int8attn",
    "compiled-nograph",
    "compiled",
)
ENGINE_CONFIGS = ("compiled-nograph", "compiled")
COMPILE_CONFIGS = {
    "compile": {},
    "compile-fa3": {"precision": "bf16", "attention": "fa3"},
    "compile-fp8": {"precision": "fp8", "attention": "sdpa"},
    "compile-fp8ffn": {"precision": "fp8-ffn", "attention": "sdpa"},
    "compile-fp8ffnattn": {"precision": "fp8-ffn", "attention": "fp8"},
    "compile-fp8attn": {"precision": "fp8", "attention": "fp8"},
    "compile-int8attn": {"precision": "fp8", "attention": "int8"},
}
"""The compile backend's configurations: the settings each one sets (the rest as requested)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    run: RunConfig
    """Model, resolution, frames, dtype, device and world size (the optimized setup)."""
    configs: tuple[str, ...] = ("reference", "paper-sp", "optimized")
    """Configurations to run (compiled needs engines)."""
    warmup: int = 1
    """Untimed videos per configuration."""
    repeat: int = 2
    """Timed videos per configuration (the median is reported)."""
    vae: str | None = None
    """Time decode with the Wan VAE: a checkpoint path, or "random" (full size, random weights);
    None = the preview decoder."""
    vae_compile: bool = False
    """Run the Wan VAE decoder through torch.compile (WanVAEDecoder(compile=True))."""
    vae_fast: bool = False
    """The Wan VAE as FastWanDecoder (ropesp/decode/wan_fast.py)."""
    vae_cudnn: bool = False
    """FastWanDecoder's convolutions as cuDNN graphs (ropesp/decode/cudnn_conv.py)."""
    taehv: str | None = None
    """Time decode with TAEHV's tiny Wan decoder (ropesp/decode/taehv.py) instead: a taew2_1 checkpoint,
    or "random" (seeded weights)."""
    decode_device: str | None = None
    """Where rank 0's decoder runs ('cuda:N', e.g. a GPU of its own beside the DiT ranks'); None = rank
    0's device. Only rank 0 decodes, as in `generate` and serving; the other ranks keep in lock-step."""
    decode: bool = True
    """Also time the video with decode (False: DiT only, for scaling runs)."""
    json_out: str | None = None
    plot_out: str | None = None
    command: str = ""
    """The command line, recorded in the JSON."""
    commit: str | None = None
    """The source commit, where the tree has no git metadata (a copy on a GPU machine)."""
    alone: bool = False
    """Run rank 0 of the P-rank configurations by itself (no peers, collectives move nothing): one
    rank's compute at world size P, on one GPU."""

    def __post_init__(self) -> None:
        bad = [c for c in self.configs if c not in CONFIGS]
        if bad:
            raise ConfigError(f"--configs {','.join(bad)}: choose from {', '.join(CONFIGS)}")
        engine_configs = [c for c in self.configs if c in ENGINE_CONFIGS]
        if engine_configs and not self.run.source.engines:
            raise ConfigError(f"--configs {','.join(engine_configs)} needs --engines DIR from `ropesp build`")
        if self.vae and self.taehv:
            raise ConfigError("--vae and --taehv: a bench run times one decoder; give one of them")
        if self.taehv and (self.vae_fast or self.vae_cudnn):
            flag = "--vae-fast" if self.vae_fast else "--vae-cudnn"
            raise ConfigError(f"{flag} acts on the Wan VAE decoder, not on --taehv's tiny one")
        check_wan_vae_options(self.vae is not None, self.vae_compile, self.decode_device, "pass --vae too")
        if self.decode_device:
            parse_device(self.decode_device, "--decode-device")  # fail before any rank starts
        for flag, value in (("--vae", self.vae), ("--taehv", self.taehv)):
            if value and not self.decode:
                raise ConfigError(f"{flag} times decode; it cannot be combined with --no-decode")
        if self.alone and self.run.parallel.world_size in (None, 1):
            raise ConfigError("--alone times rank 0 of a P-rank group by itself: pass --world-size P >= 2")
        if self.alone and self.run.parallel.ring_degree not in (None, 1):
            raise ConfigError("--alone runs the pure Ulysses layout only: drop --ring-degree")
        if self.alone and self.decode_device:
            raise ConfigError(
                "--alone times the DiT of one rank: --decode-device has no GPU of its own there"
            )
        for name in self.configs:  # FP8 hardware and libraries, before any rank starts
            if COMPILE_CONFIGS.get(name):
                overrides = COMPILE_CONFIGS[name]
                resolve(self.run.replace(backend="compile", engines=None, **overrides), default_model=False)
        if self.repeat < 1 or self.warmup < 0:
            raise ConfigError(f"--repeat {self.repeat} must be >= 1 and --warmup {self.warmup} >= 0")


def decoder_name(bench: BenchConfig) -> str | None:
    """The decoder a run times, as its JSON names it: taehv, wan-vae (any of its forms) or preview; None
    without decode."""
    if not bench.decode:
        return None
    return "taehv" if bench.taehv else "wan-vae" if bench.vae else "preview"


def decoder_caption(bench: BenchConfig) -> str:
    """The table's line on the decoder of its +dec columns, with the flags that chose it."""
    if not bench.decode:
        return "decoder: none (--no-decode)"
    chosen = [f"--taehv {bench.taehv}"] if bench.taehv else [f"--vae {bench.vae}"] if bench.vae else []
    options = (
        ("--vae-fast", bench.vae_fast),
        ("--vae-cudnn", bench.vae_cudnn),
        ("--vae-compile", bench.vae_compile),
    )
    chosen += [flag for flag, on in options if on]
    return f"decoder of the +dec columns: {decoder_name(bench)}" + (
        f" ({' '.join(chosen)})" if chosen else ""
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def _run_video(
    session: StreamSession, prompt, device, keep: list | None = None
) -> tuple[list[float], float, float]:
    """Per-chunk ready times (ms from start; with early_first_frame the first chunk's two pieces each), the
    total time and the time the whole first chunk was ready (ms) of one video. The prompt's
    cross-attention K/V (once per prompt, not DiT chunk work) are finished before the clock starts,
    and with them the first chunk's noise, which `reset` draws on the host while the device
    computes them. With several ranks the clock starts after a barrier: each rank's host work between
    videos (the noise draws, the prompt) takes a different time, and a rank that starts early would count
    its peers' lateness as its own first collective's wait (a server's ranks sit ready when a request
    comes).
    keep: a list that receives the video's latents [B, F, C, H, W] (host, float32)."""
    session.reset(prompt, seed=0)
    _sync(device)
    if session.world_size > 1 and dist.is_initialized():  # a rank --alone has nobody to wait for
        dist.barrier()
        _sync(device)
    chunks = list(session)
    _sync(device)
    if keep is not None:
        keep.append(torch.cat([c.latents.float() for c in chunks], dim=1))
    times = [chunk.elapsed_ms for chunk in chunks]
    first_chunk = max(c.elapsed_ms for c in chunks if c.index == 0)
    return times, times[-1], first_chunk


def measure(
    session: StreamSession,
    prompt,
    bench: BenchConfig,
    device,
    comm: CollectiveLog | None,
    decoder_device=None,
    decodes=True,
) -> dict:
    """Time one configuration on this rank: DiT only, then with the decoder (on decoder_device, default
    `device`; a rank with decodes=False runs the same videos without one, in lock-step). comm: the
    observer of the session's collectives (None: one rank, none)."""
    t0 = time.perf_counter()
    first_times, _, _ = _run_video(session, prompt, device)  # first video = cold forward + warm-up
    cold_first_chunk_ms = first_times[0]
    for _ in range(bench.warmup - 1):
        _run_video(session, prompt, device)
    warm_s = time.perf_counter() - t0
    dit_runs, comm_ms, latents = [], [], []
    for _ in range(bench.repeat):
        if comm is not None:
            comm.start_timing()
        dit_runs.append(_run_video(session, prompt, device, latents if not latents else None))
        comm_ms.append(comm.elapsed_ms() if comm is not None else 0.0)
    dec_runs, overlapped = [], None
    if bench.decode:
        decoder_device = decoder_device or device
        g = session.geometry  # a compiled decoder compiles here, off the clocks
        warm = WarmUp(g.latent_height, g.latent_width, session.chunk_sizes[0])
        try:
            session.decoder = (
                make_decoder(
                    bench.vae,
                    decoder_device,
                    compile=bench.vae_compile,
                    warm_up=warm,
                    fast=bench.vae_fast,
                    cudnn=bench.vae_cudnn,
                    taehv=bench.taehv,
                )
                if decodes
                else None
            )
        except CheckpointError as exc:
            raise decoder_error(exc, vae=bench.vae, taehv=bench.taehv) from None
        # serial, then decode of chunk c beside the DiT of chunk c+1 (runtime/session.py): rank 0's DiT,
        # collectives included, runs on a producer thread while it decodes; the other ranks have no
        # decoder and follow in lock-step. Each mode warmed up like the DiT (decoder compilation,
        # allocator, cuDNN plans)
        timed: dict[bool, list] = {}
        for overlap in (False, True):
            session.overlap_decode = overlap
            for _ in range(bench.warmup):
                _run_video(session, prompt, device)
            timed[overlap] = [_run_video(session, prompt, device) for _ in range(bench.repeat)]
        dec_runs, overlapped = timed[False], timed[True]
        session.overlap_decode = False
        session.decoder = None
    frames = video_frames_for(session.latent_frames)
    total_ms = _median([r[1] for r in dit_runs])
    total_dec_ms = _median([r[1] for r in dec_runs]) if dec_runs else None
    per_chunk = [
        _median([r[0][i] - (r[0][i - 1] if i else 0.0) for r in dit_runs]) for i in range(len(dit_runs[0][0]))
    ]
    return {
        "first_chunk_ms": _median([r[0][0] for r in dit_runs]),
        "first_frame_ms": _median([r[0][0] for r in dec_runs]) if dec_runs else None,
        "chunk_ms": per_chunk,
        "total_ms": total_ms,
        "fps_dit": frames / (total_ms / 1e3),
        "fps_with_decode": frames / (total_dec_ms / 1e3) if total_dec_ms else None,
        "fps_with_decode_overlapped": (
            frames / (_median([r[1] for r in overlapped]) / 1e3) if overlapped else None
        ),
        "first_frame_overlapped_ms": _median([r[0][0] for r in overlapped]) if overlapped else None,
        "first_chunk_frames_overlapped_ms": _median([r[2] for r in overlapped]) if overlapped else None,
        "early_first_frame": session.early_first_frame,
        "decoder": decoder_name(bench),
        "decode_device": str(decoder_device) if bench.decode and decodes else None,
        "comm_share": _median(comm_ms) / total_ms if total_ms else 0.0,
        "cold_first_chunk_ms": cold_first_chunk_ms,
        "warmup_s": warm_s,
        "latents": latents[0],
    }


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over all elements (0 where both are zero)."""
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def per_chunk_errors(x: torch.Tensor, ref: torch.Tensor, chunk_frames: list[int]) -> dict:
    """Relative L2 and max|d| of each chunk's latents: x, ref [B, F, C, H, W], chunks along F."""
    rels, maxes = [], []
    for a, b in zip(x.split(chunk_frames, dim=1), ref.split(chunk_frames, dim=1)):
        rels.append(rel_l2(a, b))
        maxes.append(float((a.float() - b.float()).abs().max()))
    return {"rel_l2_per_chunk": rels, "max_abs_per_chunk": maxes}


def _variant(res: ResolvedPipeline, name: str, world_size: int) -> ResolvedPipeline:
    config = res.config
    if name in ("reference", "paper-sp"):
        config = config.replace(sp_rope="allgather", sp_comm="unfused", backend="eager", engines=None)
    elif name in ("optimized", "optimized-graphs", *COMPILE_CONFIGS):
        overrides = COMPILE_CONFIGS.get(name, {})
        config = config.replace(sp_rope="local", sp_comm="fused", engines=None, **overrides)
    elif name == "compiled-nograph":
        config = config.replace(cuda_graphs=False)
    backend = res.backend if name in ENGINE_CONFIGS else "compile" if name in COMPILE_CONFIGS else "eager"
    return dataclasses.replace(res, config=config, world_size=world_size, backend=backend)


def run_rank(
    mapping: Mapping, res: ResolvedPipeline, bench: BenchConfig, prompt: torch.Tensor
) -> dict | None:
    """Every rank runs every configuration in lock-step; rank 0 returns the results. With bench.alone
    this process is rank 0 of the group by itself: no process group, AloneCollectives."""
    results: dict = {}
    device = device_for(mapping, res.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # the allocator's statistics exist only after a first use
    model = None
    first: tuple[str, torch.Tensor] | None = None
    for name in bench.configs:
        single = name == "reference"
        if single and mapping.world_size > 1 and dist.is_initialized():
            dist.barrier()
        if single and mapping.rank != 0:
            if dist.is_initialized():
                dist.barrier()
            continue
        variant = _variant(res, name, 1 if single else mapping.world_size)
        vmap = Mapping(1, 0, mapping.local_rank) if single else mapping
        if variant.backend != "eager":
            model = None  # engines load their own weights: the peak must not count two copies
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        log = CollectiveLog() if vmap.world_size > 1 else None  # the communication share
        comm = _collectives(vmap.world_size, log, bench.alone) if log is not None else None
        if variant.backend == "eager":
            from ropesp.runtime.executor import EagerExecutor

            if model is None:
                model = resolved_model(res, device)
            state = make_state(res, vmap, device, comm=comm, parallel=variant.config.parallel, slots=1)
            executor = EagerExecutor(model, state, cuda_graphs=name == "optimized-graphs")
        else:
            executor = build_executor(variant, vmap, comm, slots=1)
        session = StreamSession(
            executor,
            res.config.sampler,
            res.geometry,
            res.latent_frames,
            overlap_decode=False,
            early_first_frame=res.config.decode.early_first_frame,
        )
        build_s = time.perf_counter() - t0
        row = measure(
            session,
            prompt,
            bench,
            device,
            log,
            decoder_device=parse_device(bench.decode_device, "--decode-device")
            if bench.decode_device
            else None,
            decodes=mapping.rank == 0,
        )
        row["session_build_s"] = build_s
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        if single:
            row["peak_gib_per_rank"] = [peak]
            if dist.is_initialized():
                dist.barrier()
        else:
            peaks = [peak]
            if dist.is_initialized():  # a tensor collective (no pickled objects over NCCL)
                mine = torch.tensor([peak], dtype=torch.float64, device=device)
                parts = [torch.empty_like(mine) for _ in range(mapping.world_size)]
                dist.all_gather(parts, mine)
                peaks = [float(t.item()) for t in parts]
            row["peak_gib_per_rank"] = peaks
        row["world_size"] = vmap.world_size
        # every configuration draws the same noise on the same weights: its latents must match the
        # first one's up to the dtype's rounding (bf16: ~1e-2 on values of magnitude ~1)
        latents = row.pop("latents")
        if first is None:
            first = (name, latents)
        diff = (latents - first[1]).abs()
        row["latents_vs"] = {
            "config": first[0],
            "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()),
            "rel_l2": rel_l2(latents, first[1]),
            **per_chunk_errors(latents, first[1], res.chunk_sizes()),
        }
        results[name] = row
        if mapping.rank == 0:  # progress: a run cut short still shows the configurations it finished
            print(
                f"bench: {name}: first chunk {row['first_chunk_ms']:.1f} ms, {row['fps_dit']:.1f} FPS, "
                f"cold first chunk {row['cold_first_chunk_ms'] / 1e3:.1f} s, rel L2 vs "
                f"{first[0]} {row['latents_vs']['rel_l2']:.2e}",
                file=sys.stderr,
                flush=True,
            )
        # free this configuration's cache before the next one allocates its own (peaks are per config)
        del session, executor, comm
        state = None
        gc.collect()
    return results if mapping.rank == 0 else None


def _collectives(world_size: int, log: CollectiveLog, alone: bool) -> Collectives:
    """This rank's collectives, seen by log: over the process group, or moving nothing (--alone)."""
    return AloneCollectives(world_size, log) if alone else Collectives(None, world_size, log)


def environment(res: ResolvedPipeline, commit: str | None = None) -> dict:
    """Card, versions and commit (given, or read from git), recorded next to every number."""
    card = (
        torch.cuda.get_device_name(0)
        if res.device == "cuda" and torch.cuda.is_available()
        else platform.processor() or "cpu"
    )
    if commit is None:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "card": card,
        "gpus": torch.cuda.device_count() if res.device == "cuda" else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if res.device == "cuda" else None,
        "git_commit": commit,
        "python": platform.python_version(),
    }


def report(res: ResolvedPipeline, bench: BenchConfig, results: dict) -> dict:
    """Assemble the JSON, print the table, write JSON and plot as asked."""
    from ropesp.flops import video_flops

    flops = video_flops(
        res.model, res.geometry.frame_tokens, res.config.sampler, res.latent_frames, res.cache
    )
    for row in results.values():  # achieved matrix throughput, against the GPU's measured GEMM rate
        row["tflops_per_gpu"] = flops["total"] / (row["total_ms"] / 1e3) / row["world_size"] / 1e12
    out = {
        "environment": environment(res, bench.commit),
        "command": bench.command,
        "setup": {
            "model": res.model.to_dict(),
            "latent_height": res.geometry.latent_height,
            "latent_width": res.geometry.latent_width,
            "latent_frames": res.latent_frames,
            "video_frames": video_frames_for(res.latent_frames),
            "dtype": str(res.dtype).removeprefix("torch."),
            "device": res.device,
            "world_size": res.world_size,
            "steps": list(res.config.sampler.steps),
            "chunk_frames": res.config.sampler.chunk_frames,
            "warmup": bench.warmup,
            "repeat": bench.repeat,
            "alone": bench.alone,
            "flops_per_video": flops,
        },
        "results": results,
    }
    base = results.get("paper-sp") or results.get("reference")
    print(format_table(results, base))
    print(decoder_caption(bench))
    for name, r in results.items():
        if r["early_first_frame"] and r["first_frame_overlapped_ms"] is not None:
            print(
                f"{name}: first frame handed over apart (--early-first-frame), overlapped: "
                f"{r['first_frame_overlapped_ms']:.1f} ms; the first chunk's frames all "
                f"{r['first_chunk_frames_overlapped_ms']:.1f} ms"
            )
    if bench.alone:
        print(
            f"--alone: rank 0 of {res.world_size} ran by itself, its collectives moving no data (compute only; max|d| meaningless)"
        )
    if bench.json_out:
        write_report(bench.json_out, out, indent=2)
    if bench.plot_out:
        plot(out, bench.plot_out)
    return out


def format_table(results: dict, base: dict | None) -> str:
    head = f"{'config':<16} {'P':>2} {'1st chunk ms':>12} {'1st frame ms':>12} {'FPS DiT':>8} {'FPS +dec':>8} {'+dec ovl':>8} {'vs base':>7} {'comm %':>6} {'peak GiB':>8} {'TF/s/GPU':>8} {'max|d|':>7}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        speed = f"{base['total_ms'] / r['total_ms']:.2f}x" if base else "-"
        lines.append(
            f"{name:<16} {r['world_size']:>2} {r['first_chunk_ms']:>12.1f} {_fmt(r['first_frame_ms']):>12} "
            f"{r['fps_dit']:>8.1f} {_fmt(r['fps_with_decode']):>8} {_fmt(r['fps_with_decode_overlapped']):>8} {speed:>7} {100 * r['comm_share']:>6.1f} "
            f"{max(r['peak_gib_per_rank']):>8.2f} {r['tflops_per_gpu']:>8.1f} {r['latents_vs']['max_abs']:>7.3f}"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def plot(out: dict, path: str) -> None:
    """PNG: per-chunk latency (stacked) and FPS per configuration."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib (pip install matplotlib)") from exc
    results = out["results"]
    names = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    bottom = [0.0] * len(names)
    n_chunks = max(len(r["chunk_ms"]) for r in results.values())
    for i in range(n_chunks):
        vals = [results[n]["chunk_ms"][i] if i < len(results[n]["chunk_ms"]) else 0.0 for n in names]
        ax1.bar(names, vals, bottom=bottom, label=f"chunk {i}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("ms (DiT, per chunk, stacked)")
    ax1.set_title("latency breakdown")
    ax1.legend(fontsize=6)
    ax2.bar(names, [results[n]["fps_dit"] for n in names], label="DiT only")
    if all(results[n]["fps_with_decode"] is not None for n in names):
        decoder = next(iter(results.values()))["decoder"]
        ax2.bar(
            names, [results[n]["fps_with_decode"] for n in names], alpha=0.5, label=f"with {decoder} decode"
        )
    ax2.set_ylabel("video frames / s")
    ax2.set_title("throughput")
    ax2.legend()
    env, setup = out["environment"], out["setup"]
    fig.suptitle(
        f"{env['card']} x{setup['world_size']}, torch {env['torch']}, {setup['dtype']}, "
        f"{setup['latent_height'] * 8}x{setup['latent_width'] * 8}, {setup['video_frames']} frames"
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(
    bench: BenchConfig, prompt: torch.Tensor, resolved: tuple[ResolvedPipeline, Mapping] | None = None
) -> dict:
    """Start the ranks through the engine's rank group (spawned, or torchrun's), run every configuration
    on every rank in step, report on rank 0 (a follower under torchrun returns {}). resolved: what
    resolve_rank(bench.run) returned, where the caller has it (the rank environment is read once)."""
    from ropesp.runtime.pipeline import resolve_rank
    from ropesp.runtime.ranks import RankGroup, under_launcher

    res, mapping = resolved or resolve_rank(bench.run, default_model=False)
    if bench.taehv:  # the decoders' weights before any rank starts
        check_taehv(bench.taehv, res.model.out_dim)
    if bench.vae and bench.vae != RANDOM_VAE:
        check_vae(bench.vae)
    if res.world_size == 1 and "paper-sp" in bench.configs:
        # one rank: the paper's SP baseline degenerates to the reference configuration
        bench = dataclasses.replace(bench, configs=tuple(c for c in bench.configs if c != "paper-sp"))
    if bench.alone:
        if under_launcher():
            raise ConfigError("--alone runs one process by itself: start it without torchrun")
        return report(res, bench, run_rank(Mapping(res.world_size, 0, 0), res, bench, prompt))
    spawned = mapping.rank == 0 and not under_launcher()
    with RankGroup(res.world_size, res.device, mapping=None if spawned else mapping) as group:
        if not group.is_leader:
            group.follow({})
            return {}
        results = group.call(run_rank, res, bench, prompt)
    return report(res, bench, results)
