"""What the FP8 GEMMs' rounding costs the demo model over long streams, emulated in fp32 on the CPU.

    python scripts/fp8_gemm_emulation.py --checkpoint DIR [--per-class 6] [--frames 120] --json out.json

`--precision fp8` (plugins/fp8.py) runs every block Linear that FP8_LINEARS selects as an e4m3 GEMM: the
weight rounded once to e4m3 with one scale per output channel, the input rounded per row (one scale per
token), accumulation in fp32; the stream adapter's blocks share their base blocks' rounded weights and add
the adapter's delta (fp8.stream_linears). This replaces apply_fp8 with
exactly those two roundings on fp32 tensors (weights in place at load, inputs by a forward pre-hook),
everything else fp32 eager, so the only difference from the fp32 run beside it is e4m3's rounding. The
GPU path also rounds its bf16 output and activations; tests/demo/test_gpu.py scores that path itself.
Both runs stream the same prompts and seeds under the page's window (ropesp.demo.long_stream) and are
scored per motion class; the JSON holds each stream's score for both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from ropesp.demo import default_checkpoint
from ropesp.demo.long_stream import (
    PAGE_WINDOW,
    StreamJob,
    class_means,
    generate_streams,
    long_jobs,
    score_streams,
)
from ropesp.plugins import fp8
from ropesp.runtime import pipeline
from ropesp.settings import RunConfig

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


def round_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] rounded to e4m3 with one scale per row (amax / 448) and back, in x's dtype."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def emulate_fp8(model: nn.Module, config=None, precision: str = "fp8") -> list[str]:
    """apply_fp8's selection with its roundings emulated: weights rounded here, inputs per call."""
    names = fp8.fp8_linear_names(model, precision)
    shared = fp8.stream_linears(model, names)
    modules = dict(model.named_modules())
    with torch.no_grad():
        # a stream block's weight is its base block's, rounded once, plus the adapter's exact delta:
        # taken before the base weights (which the shared Linears' parameters are) are rounded in place
        stream = {
            name: round_rows(modules[base].weight.float())
            + (modules[name].weight.float() - modules[base].weight.float())
            for name, (base, delta) in shared.items()
            if delta is not None
        }
        for name in names:
            linear = modules[name]
            if name in stream:
                linear.weight.copy_(stream[name])
            elif name not in shared:
                linear.weight.copy_(round_rows(linear.weight))
            linear.register_forward_pre_hook(lambda _m, args: (round_rows(args[0]), *args[1:]))
    return names


def stream_scores(checkpoint: str, jobs: list[StreamJob], emulated: bool) -> list:
    extra = {"precision": "fp8"} if emulated else {}
    cfg = RunConfig.of(
        checkpoint=checkpoint, device="cpu", dtype="float32", **PAGE_WINDOW.settings(), **extra
    )
    with (
        # the GPU-only checks of --precision fp8 (sm_89+, bf16 activations) refuse this fp32 CPU run
        mock.patch.object(pipeline, "check_precision", lambda *a, **k: None),
        mock.patch.object(fp8, "apply_fp8", emulate_fp8),
        torch.no_grad(),
    ):
        latents = generate_streams(cfg, jobs)
    return score_streams(latents, [(j.prompt, j.seed) for j in jobs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(default_checkpoint()))
    ap.add_argument("--per-class", type=int, default=6, help="streams per motion class")
    ap.add_argument("--frames", type=int, default=120, help="latent frames per stream")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.per_class < 1:
        ap.error(f"--per-class {args.per_class}: at least 1 stream per motion class")
    if args.frames < 9:
        ap.error(f"--frames {args.frames}: at least 9 latent frames (the short videos' length)")
    if not (Path(args.checkpoint) / "config.json").is_file():
        ap.error(f"--checkpoint {args.checkpoint}: not a checkpoint directory")
    if not Path(args.json).parent.is_dir():
        ap.error(f"--json {args.json}: no such directory")  # before minutes of streams, not after
    jobs = long_jobs(args.per_class, args.frames)
    report = {"checkpoint": args.checkpoint, "frames": args.frames, "window": str(PAGE_WINDOW), "runs": {}}
    for name, emulated in (("fp32", False), ("fp8-gemm-emulated", True)):
        t0 = time.perf_counter()
        results = stream_scores(args.checkpoint, jobs, emulated)
        means = class_means(results)
        report["runs"][name] = {
            "means": means,
            "streams": [{"prompt": r.prompt, "seed": r.seed, "score": r.score} for r in results],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(name, " ".join(f"{m} {v:.3f}" for m, v in means.items()), flush=True)
    Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
