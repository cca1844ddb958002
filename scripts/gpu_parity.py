"""Parity on GPUs: a P-rank (or engine) bf16 generation vs eager on 1 rank (random weights, same seed).

    python scripts/gpu_parity.py --world-size 2 [--ulysses-degree 1 --ring-degree 2] \
        [--backend compile | --engines DIR] [--no-cuda-graphs] --json out.json

The baseline is the eager model on one GPU; the candidate runs with the given world size, SP layout
and backend. Engines built by `ropesp build` without a checkpoint hold the same seeded random weights
as the eager path. The latents' max and mean absolute difference are reported (bf16: differences come
from reduction order and kernel choice, amplified over 35 forwards and 7 chunks).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ropesp.runtime.pipeline import build_session
from ropesp.runtime.prompts import default_prompt_embeds
from ropesp.runtime.ranks import run_on_ranks
from ropesp.settings import RunConfig


def _run(mapping, cfg: RunConfig) -> dict | None:
    session = build_session(cfg, mapping)
    session.reset(default_prompt_embeds(session.executor.cfg), seed=0)
    t0 = time.perf_counter()
    latents = session.generate()
    return {"latents": latents, "seconds": time.perf_counter() - t0} if mapping.rank == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--ulysses-degree", type=int)
    ap.add_argument("--ring-degree", type=int)
    ap.add_argument("--engines", help="candidate runs these engines (built for --world-size)")
    ap.add_argument("--backend", help="candidate backend: compile, or that of --engines (default)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="candidate runs without CUDA graphs")
    ap.add_argument("--latent-height", type=int, default=60)
    ap.add_argument("--latent-width", type=int, default=104)
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    ap.add_argument("--json")
    args = ap.parse_args()
    common = dict(
        latent_height=args.latent_height,
        latent_width=args.latent_width,
        latent_frames=args.latent_frames,
        dtype=args.dtype,
        device=args.device,
    )
    runs = {
        "eager_ws1": RunConfig.of(preset=args.preset, world_size=1, **common),
        "candidate": RunConfig.of(
            preset=None if args.engines else args.preset,
            engines=args.engines,
            backend=args.backend,
            cuda_graphs=not args.no_cuda_graphs,
            world_size=args.world_size,
            ulysses_degree=args.ulysses_degree,
            ring_degree=args.ring_degree,
            **common,
        ),
    }
    results = {
        name: run_on_ranks(cfg.parallel.world_size, args.device, _run, cfg) for name, cfg in runs.items()
    }
    a, b = results["eager_ws1"]["latents"], results["candidate"]["latents"]
    diff = (a - b).abs()
    out = {
        "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "latent_abs_mean": a.abs().mean().item(),
        "seconds_eager_ws1": results["eager_ws1"]["seconds"],
        "seconds_candidate": results["candidate"]["seconds"],
        "finite": bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
