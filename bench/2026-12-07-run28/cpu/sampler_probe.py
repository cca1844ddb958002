"""The shipped demo weights over 120-frame streams of four bouncing prompts x 2 seeds, window 9/3, fp32, under
another sampler schedule (twenty-eighth session, bench/RESULTS.md).

    python bench/2026-12-07-run28/cpu/sampler_probe.py [--shift 1] [--steps 1000,750,500,250,100]
"""

from __future__ import annotations

import argparse

import torch

from ropesp.demo import default_checkpoint
from ropesp.demo.long_stream import StreamJob, fraction, frame_misses, generate_streams, held_of
from ropesp.demo.prompts import parse
from ropesp.settings import RunConfig

PROMPTS = (
    "two white squares bouncing",
    "a white square bouncing",
    "two white discs bouncing",
    "three white squares bouncing",
)
SEEDS = (2104, 7)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--shift", type=float, default=None)
p.add_argument("--steps", default=None, help="e.g. 1000,750,500,250,100")
args = p.parse_args()
sampler = {}
if args.shift is not None:
    sampler["shift"] = args.shift
if args.steps:
    sampler["steps"] = tuple(int(s) for s in args.steps.split(","))
torch.set_grad_enabled(False)
cfg = RunConfig.of(
    checkpoint=str(default_checkpoint()),
    device="cpu",
    dtype="float32",
    local_attn_frames=9,
    sink_frames=3,
    **sampler,
)
jobs = [StreamJob(prompt, seed, 120) for prompt in PROMPTS for seed in SEEDS]
scores = []
for job, latents in zip(jobs, generate_streams(cfg, jobs), strict=True):
    misses = frame_misses(latents, parse(job.prompt), job.seed)
    scores.append(fraction(held_of(misses)))
    counts = {why: misses.count(why) for why in ("shape", "fewer", "more")}
    print(job.prompt, job.seed, round(scores[-1], 3), counts)
print(sampler, "mean", sum(scores) / len(scores))
