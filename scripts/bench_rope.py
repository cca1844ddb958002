"""Time Causal-RoPE SP variants at Wan-1.3B 480p shapes (chunk 3 x 30 x 52 = 4680 tokens, 12 x 128, bf16).

    python scripts/bench_rope.py                      # CUDA: reference vs tables vs the ropesp::rope_sp op
    python scripts/bench_rope.py --device cpu         # smoke check at a small shape
    python scripts/bench_rope.py --json out.json

Rows: the upstream reference (float64 complex multiplier per call, full chunk), the fp32 tables path
(ropesp.model.rope.rope_apply) on the full chunk and on one rank's tokens, and the op (Triton on CUDA,
the torch reference on the CPU) on the full chunk and on one rank's tokens (first_token = rank * L/P).
CUDA timings use events after warm-up; the median of --iters calls is reported, eager (one call between
two events: launch overhead included, as an eager runtime pays it) and, where the variant can be captured,
replayed from a CUDA graph of 20 calls (the GPU time alone, as a graph-captured runtime pays it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cuda_timing.py beside this file
from cuda_timing import median_ms

from ropesp.model.rope import RopeTables, rope_apply, rope_apply_ref
from ropesp.plugins.rope_sp import rope_sp

WAN_480P = dict(frames=3, rows=30, cols=52, heads=12, head_dim=128)
CPU_SMOKE = dict(frames=2, rows=6, cols=8, heads=4, head_dim=64)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds per call of fn() after warm-up (CUDA events on a GPU: cuda_timing.median_ms)."""
    if device.type == "cuda":
        return median_ms(fn, reps=iters, warmup=warmup)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def graph_ms(fn, device: torch.device, warmup: int, iters: int, calls: int = 20) -> float | None:
    """Median milliseconds per call of fn() replayed from a CUDA graph of `calls` calls (no launch gaps)."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, Triton JIT)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, device, warmup, iters) / calls


def run(args) -> dict:
    device = torch.device(args.device)
    shape = dict(WAN_480P if device.type == "cuda" else CPU_SMOKE)
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    frames, rows, cols, heads, head_dim = (shape[k] for k in ("frames", "rows", "cols", "heads", "head_dim"))
    dtype = DTYPES[args.dtype]
    seq = frames * rows * cols
    per_rank = -(-seq // args.world)
    first = args.rank * per_rank
    g = torch.Generator("cpu").manual_seed(0)
    full = torch.randn(1, per_rank * args.world, heads, head_dim, generator=g).to(
        device, dtype
    )  # [B, L, H, D]
    local = full[:, first : first + per_rank].contiguous()  # [B, L/P, H, D], this rank's tokens
    start, theta = args.start_frame, args.theta
    start_t = torch.tensor([start], dtype=torch.int32, device=device)
    tables = RopeTables(head_dim, start + frames, rows, cols, theta, device)
    # name: (tokens, fn, graphable); the reference builds its table on the host, so it is never captured
    cases = {
        "reference f64, full chunk": (seq, lambda: rope_apply_ref(full, start, frames, rows, cols, theta), False),
        "fp32 tables, full chunk": (seq, lambda: rope_apply(full, start_t, tables, frames, rows, cols), True),
        "fp32 tables, rank tokens": (
            per_rank, lambda: rope_apply(local, start_t, tables, frames, rows, cols, first), True,
        ),
        "rope_sp op, full chunk": (seq, lambda: rope_sp(full, start_t, frames, rows, cols, 0, theta), True),
        "rope_sp op, rank tokens": (
            per_rank, lambda: rope_sp(local, start_t, frames, rows, cols, first, theta), True,
        ),
    }  # fmt: skip
    results = []
    with torch.inference_mode():
        for name, (tokens, fn, graphable) in cases.items():
            ms = time_ms(fn, device, args.warmup, args.iters)
            graph = graph_ms(fn, device, args.warmup, args.iters) if graphable else None
            results.append({"name": name, "tokens": tokens, "ms": ms, "graph_ms": graph})
    base = results[0]["ms"]
    for r in results:
        r["speedup_vs_reference"] = base / r["ms"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "shape": shape | {"world": args.world, "rank": args.rank, "first_token": first, "start_frame": start},
        "results": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    for name in ("frames", "rows", "cols", "heads", "head_dim"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, help="overrides the default shape")
    p.add_argument("--world", type=int, default=2, help="sequence-parallel size P")
    p.add_argument("--rank", type=int, default=1, help="the rank whose tokens are rotated")
    p.add_argument("--start-frame", type=int, default=9)
    p.add_argument("--theta", type=float, default=10000.0)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--json", help="also write the results to this path")
    args = p.parse_args()
    if not 0 <= args.rank < args.world:
        p.error(f"--rank {args.rank} must be in [0, {args.world})")
    report = run(args)
    print(f"{report['device']}  torch {report['torch']}  {report['dtype']}  {report['shape']}")
    print(f"{'variant':<28}{'tokens':>8}{'eager ms':>10}{'x ref':>8}{'graph ms':>10}")
    for r in report["results"]:
        graph = "-" if r["graph_ms"] is None else f"{r['graph_ms']:.4f}"
        print(f"{r['name']:<28}{r['tokens']:>8}{r['ms']:>10.4f}{r['speedup_vs_reference']:>8.1f}{graph:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
