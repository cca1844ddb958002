"""SP parity on GPUs: P-rank bf16 generation vs 1 rank (Wan-1.3B shapes, random weights).

    python scripts/gpu_parity.py --world-size 2 --json out.json

Both runs use the same seeded weights (drawn on the GPU) and noise; the latents' max and mean
absolute difference are reported (bf16: differences come from reduction order, amplified over 35
forwards and 7 chunks).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ropesp.runtime.launch import process_group, spawn_ranks
from ropesp.runtime.pipeline import PipelineConfig, build_session
from ropesp.runtime.prompts import default_prompt_embeds


def _run(mapping, cfg: PipelineConfig, out: str) -> None:
    with process_group(mapping, "cuda"):
        session = build_session(cfg, mapping)
        session.reset(default_prompt_embeds(session.executor.cfg), seed=0)
        t0 = time.perf_counter()
        latents = session.generate()
        if mapping.rank == 0:
            torch.save({"latents": latents, "seconds": time.perf_counter() - t0}, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ws in (1, args.world_size):
            cfg = PipelineConfig(
                preset=args.preset,
                latent_frames=args.latent_frames,
                dtype=args.dtype,
                device="cuda",
                world_size=ws,
            )
            path = str(Path(tmp) / f"ws{ws}.pt")
            spawn_ranks(ws, _run, cfg, path)
            results[ws] = torch.load(path)
    a, b = results[1]["latents"], results[args.world_size]["latents"]
    diff = (a - b).abs()
    out = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "latent_frames": args.latent_frames,
        "world_size": args.world_size,
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "latent_abs_mean": a.abs().mean().item(),
        "seconds_ws1": results[1]["seconds"],
        f"seconds_ws{args.world_size}": results[args.world_size]["seconds"],
        "finite": bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
