"""How much a few training steps of a recipe cost the short videos: held-out losses before and after.

    python scripts/forgetting_probe.py --steps 60 --recipe stream_prob=0.5,stream_weight=0.15 --json out.json

A CPU-sized stand-in for a GPU training run (ropesp.demo.train): from the shipped demo weights, `--steps`
optimizer steps at batch `--batch`, then the flow-matching loss (ropesp.demo.train's objective, unweighted)
on 4 fixed held-out short-video batches and 4 fixed stream batches, drawn from another seed than training.
Runs of different recipes draw the same training batches up to where the recipes differ (one seed), so
two runs side by side compare recipes, e.g. with and without stream batches.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

import torch

from ropesp.demo import default_checkpoint
from ropesp.demo.segments import segment_flow
from ropesp.demo.train import TrainConfig, Trainer

BASE = dict(
    warmup=10,
    lr=1.5e-4,
    ema=0.0,
    stream_prob=0.5,
    stream_windows="9/3,9/3,6/0,12/3",
    switch_prob=0.15,
    rollout_prob=0.0,
    edge_weight=3.0,
    step_weights="1,1,1,3",
    time_limit_s=1e9,
)
"""The probe's recipe before --recipe: the GPU runs' (bench/RESULTS.md, issue #39) without own-sample
contexts (a CPU step with them costs 4x)."""


def parse_recipe(text: str) -> dict:
    """'key=value,...' of TrainConfig fields, each value parsed as its field's type."""
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--recipe {item!r}: no TrainConfig field {key!r}")
        out[key] = types[key](value)
    return out


def flow_loss(model: torch.nn.Module, batches: list) -> float:
    total = 0.0
    with torch.no_grad():
        for b in batches:
            flow = segment_flow(model, b.clean, b.noisy, b.t, b.prompts, b.layout, b.chunks, b.switch)
            total += float((flow - (b.eps - b.x0)).pow(2).mean())
    return total / len(batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--recipe", default="", help="TrainConfig fields over the probe's BASE, 'k=v,k=v'")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = {**BASE, "batch": args.batch, **parse_recipe(args.recipe)}
    held = Trainer(TrainConfig(**{**recipe, "seed": 123}), torch.device("cpu"))
    videos = [held.video_batch() for _ in range(4)]
    streams = [held.stream_batch() for _ in range(4)]
    trainer = Trainer(TrainConfig(**recipe), torch.device("cpu"))
    trainer.init_from(Path(default_checkpoint()))
    before = flow_loss(trainer.model, videos), flow_loss(trainer.model, streams)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(0.0)
    after = flow_loss(trainer.model, videos), flow_loss(trainer.model, streams)
    result = {
        "recipe": {k: recipe[k] for k in sorted(recipe)},
        "steps": args.steps,
        "video_loss": [round(before[0], 6), round(after[0], 6)],
        "stream_loss": [round(before[1], 6), round(after[1], 6)],
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
