"""Where one video's time goes on a GPU: torch.profiler over one warm 81-frame video, as seen by rank 0.

    python scripts/profile_chunk.py --preset wan2.1-1.3b --latent-height 60 --latent-width 104 \
        [--engines DIR --backend aoti] [--precision fp8 --attention fp8] [--vae random] [--world-size P [--alone]] --json prof.json --trace trace.json.gz

With --world-size P every rank runs the same videos (Ulysses SP, lock-step, each video started after a
barrier) and rank 0 alone is profiled: its NCCL kernels' time includes waiting for the slowest peer, so
the "nccl" share is what the collectives cost this rank, exchange and skew together. With --alone rank 0
runs by itself on one GPU, its collectives moving nothing (`ropesp bench --alone`): one rank's kernels at
world size P without any communication, to set beside the P = 1 profile.

Writes a JSON summary: GPU kernel time per category (GEMM, attention, NCCL, RoPE, fused elementwise,
copies, other), GPU busy time against the video's wall time (the rest is the GPU waiting for the host),
the number of synchronizing CUDA runtime calls against the number of chunks (the session reads each
chunk's latents once; anything more is a host sync inside the chunk loop), and the top kernels.
With --vae the decoder runs overlapped on its own stream (runtime/session.py), visible in the trace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from ropesp.runtime.dist import Mapping, device_for
from ropesp.runtime.pipeline import build_session
from ropesp.runtime.prompts import default_prompt_embeds
from ropesp.runtime.ranks import run_on_ranks
from ropesp.runtime.sp import AloneCollectives
from ropesp.settings import RunConfig

CATEGORIES = (  # first match wins; kernel names are lower-cased
    ("nccl", ("nccl",)),
    ("rope", ("rope",)),
    # before attention: cuDNN's convolution kernels also carry "cudnn" in their names (and the SDPA kernel
    # "flash_fprop", hence "xmma_fprop", not "fprop")
    ("convolution (VAE, patch embedding)", ("implicit_gemm", "xmma_fprop", "winograd", "dgrad", "conv")),
    ("attention", ("cudnn", "flash", "fmha", "attention", "sdpa", "sm90_flash")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "_mm_", "matmul")),
    ("fused elementwise (inductor/triton)", ("triton_",)),
    ("copy/memset", ("memcpy", "memset", "copy", "cat")),
)
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
"""CUDA runtime calls that block the host (cudaMemcpy without Async: a synchronous copy)."""


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_rank(mapping: Mapping, args: argparse.Namespace) -> None:
    """Warm up, then one video under the profiler on rank 0 (the other ranks run it unprofiled)."""
    # --alone: rank 0 by itself, no process group; its collectives move nothing (ropesp bench --alone)
    alone = args.alone and mapping.world_size > 1
    device = device_for(mapping, args.device)
    cfg = RunConfig.of(
        preset=None if args.engines else args.preset,
        engines=args.engines,
        backend=args.backend,
        latent_height=args.latent_height,
        latent_width=args.latent_width,
        latent_frames=args.latent_frames,
        dtype=args.dtype,
        device=args.device,
        world_size=mapping.world_size,
        precision=args.precision,
        attention=args.attention,
    )
    decoder = None
    if args.vae and mapping.rank == 0:  # rank 0 decodes, as in generate, serving and the bench
        from ropesp.decode.factory import make_decoder

        decoder = make_decoder(args.vae, device)
    comm = AloneCollectives(mapping.world_size) if alone else None
    session = build_session(cfg, mapping, decoder=decoder, comm=comm, overlap_decode=decoder is not None)
    prompt = default_prompt_embeds(session.executor.cfg)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):  # warm-up: compile, CUDA graph capture, allocator
        session.reset(prompt, seed=0)
        session.generate()
    session.reset(prompt, seed=0)
    sync()
    if dist.is_initialized():
        dist.barrier()  # every rank starts the video together (see ropesp.bench._run_video)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) if mapping.rank == 0 else contextlib.nullcontext() as prof:
        t0 = time.perf_counter()
        chunks = [c.elapsed_ms for c in session]
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3
    if mapping.rank != 0:
        return
    out = summarize(prof, wall_ms, chunks)
    out = {"card": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "args": vars(args), **out}  # fmt: skip
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    print(json.dumps({k: v for k, v in out.items() if k != "top_kernels_ms"}, indent=1))
    for name, ms in out["top_kernels_ms"][:12]:
        print(f"{ms:9.2f} ms  {name[:110]}")


def summarize(prof, wall_ms: float, chunks: list[float]) -> dict:
    """Kernel time per category, GPU busy time (union over streams), synchronizing calls, top kernels."""
    per_cat: dict[str, float] = defaultdict(float)
    kernels: dict[str, float] = defaultdict(float)
    syncs: dict[str, int] = defaultdict(int)
    intervals = []
    for ev in prof.events():
        # record_function ranges (ropesp.dit.*) also appear as device events spanning their kernels:
        # counting them would double the busy time and file them under "rope"
        annotation = getattr(ev, "is_user_annotation", False) or ev.name.startswith("ropesp.")
        if ev.device_type == torch.autograd.DeviceType.CUDA and not annotation:
            us = ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
            per_cat[category(ev.name)] += us / 1e3
            kernels[ev.name] += us / 1e3
            intervals.append((ev.time_range.start, ev.time_range.end))
        elif ev.name in SYNC_CALLS:
            syncs[ev.name] += 1
    intervals.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for start, end in intervals:  # union of kernel intervals (streams overlap)
        if cur_e is None or start > cur_e:
            busy += (cur_e - cur_s) if cur_e is not None else 0.0
            cur_s, cur_e = start, end
        else:
            cur_e = max(cur_e, end)
    busy += (cur_e - cur_s) if cur_e is not None else 0.0
    return {
        "wall_ms": wall_ms,
        "chunk_ready_ms": chunks,
        "gpu_busy_ms": busy / 1e3,
        "gpu_busy_share": busy / 1e3 / wall_ms,
        "kernel_ms_by_category": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "sync_calls": dict(syncs),
        "chunks": len(chunks),
        "top_kernels_ms": sorted(kernels.items(), key=lambda kv: -kv[1])[:25],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--latent-height", type=int, default=60)
    ap.add_argument("--latent-width", type=int, default=104)
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--engines")
    ap.add_argument("--precision", default="bf16", help="bf16, fp8 or fp8-ffn (the block Linears' GEMMs)")
    ap.add_argument("--attention", default="sdpa", help="the self-attention kernel (e.g. fp8)")
    ap.add_argument("--vae", help="'random' or a checkpoint: decode overlapped with the DiT")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    ap.add_argument("--world-size", type=int, default=1, help="ranks (one GPU each); rank 0 is profiled")
    ap.add_argument(
        "--alone", action="store_true", help="rank 0 of --world-size by itself (no communication)"
    )
    ap.add_argument("--json", required=True)
    ap.add_argument("--trace", help="chrome trace (.json or .json.gz)")
    args = ap.parse_args()
    if args.world_size == 1 or args.alone:
        profile_rank(Mapping(args.world_size, 0, 0), args)
    else:
        run_on_ranks(args.world_size, args.device, profile_rank, args)


if __name__ == "__main__":
    main()
