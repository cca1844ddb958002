"""Quality gate for FP8: final latents of one video per precision mode against bf16 and fp32.

    python scripts/fp8_quality.py --preset wan2.1-1.3b --frames 81 --json OUT.json

Each mode streams the same video (same seeded random weights, same noise: seed 0) and keeps every
chunk's final latents. Reported per mode and per chunk: relative L2 error and max|d| against the bf16
compile path and against fp32 (eager, the closest to exact), NaN/inf, and whether a second video in the
same session reproduces the first bit for bit. bf16 against fp32 is the yardstick: a mode whose error
against bf16 is of the order of bf16's own error against fp32 changes the video no more than running
in bf16 does.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback

import torch

from ropesp.bench import per_chunk_errors, rel_l2
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.runtime.prompts import default_prompt_embeds
from ropesp.settings import RunConfig

MODES = {
    # name: (dtype, backend, precision, attention)
    "fp32": ("float32", "eager", "bf16", "sdpa"),
    "bf16": ("bfloat16", "compile", "bf16", "sdpa"),
    "fa3": ("bfloat16", "compile", "bf16", "fa3"),
    "fp8": ("bfloat16", "compile", "fp8", "sdpa"),
    "fp8attn": ("bfloat16", "compile", "fp8", "fp8"),
    "int8attn": ("bfloat16", "compile", "fp8", "int8"),
    "fp8ffn": ("bfloat16", "compile", "fp8-ffn", "sdpa"),
    "fp8ffnattn": ("bfloat16", "compile", "fp8-ffn", "fp8"),
    "attn-fp8-only": ("bfloat16", "compile", "bf16", "fp8"),
}


def video(session, prompt) -> torch.Tensor:
    """[B, F, C, H, W] float32 host latents of one video (seed 0)."""
    session.reset(prompt, seed=0)
    return torch.cat([c.latents.float().cpu() for c in session], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--frames", type=int, default=81, help="video frames (4k + 1)")
    ap.add_argument("--modes", default="bf16,fp8,fp8attn,int8attn,fp32")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    latent_frames = (args.frames + 3) // 4
    out: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "frames": args.frames,
        "modes": {},
    }
    latents: dict[str, torch.Tensor] = {}
    chunks = None
    for name in args.modes.split(","):
        dtype, backend, precision, attention = MODES[name]
        t0 = time.perf_counter()
        row: dict = {"dtype": dtype, "backend": backend, "precision": precision, "attention": attention}
        try:
            config = RunConfig.of(
                preset=args.preset,
                latent_frames=latent_frames,
                dtype=dtype,
                backend=backend,
                precision=precision,
                attention=attention,
                device="cuda",
            )
            res = resolve(config)
            chunks = res.config.sampler.chunk_sizes(res.latent_frames)
            session = build_session(res)
            prompt = default_prompt_embeds(res.model)
            first = video(session, prompt)
            if backend == "compile":  # a second video replays the captured graphs
                again = video(session, prompt)
                row["repeat_max_abs"] = float((again - first).abs().max())
            row["finite"] = bool(torch.isfinite(first).all())
            row["latent_abs_mean"] = float(first.abs().mean())
            latents[name] = first
            del session
        except Exception:
            row["error"] = traceback.format_exc()[-3000:]
        gc.collect()
        torch.cuda.empty_cache()
        row["seconds"] = time.perf_counter() - t0
        out["modes"][name] = row
        print(name, json.dumps(row), flush=True)
        for ref in ("bf16", "fp32"):
            for mode, x in latents.items():
                if ref in latents and mode != ref:
                    out["modes"][mode][f"vs_{ref}"] = {
                        "rel_l2": rel_l2(x, latents[ref]),
                        "max_abs": float((x - latents[ref]).abs().max()),
                        **per_chunk_errors(x, latents[ref], chunks),
                    }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    for mode, row in out["modes"].items():
        for ref in ("bf16", "fp32"):
            if f"vs_{ref}" in row:
                r = row[f"vs_{ref}"]
                print(f"{mode:>14} vs {ref}: rel L2 {r['rel_l2']:.4f} max|d| {r['max_abs']:.3f}")


if __name__ == "__main__":
    main()
