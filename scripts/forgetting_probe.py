"""How much a few training steps of a recipe cost the short videos: held-out losses before and after.

    python scripts/forgetting_probe.py --steps 60 --recipe stream_prob=0.5,stream_weight=0.15 --json out.json

A CPU-sized stand-in for a GPU training run (ropesp.demo.train): from the shipped demo weights, `--steps`
optimizer steps at batch `--batch`, then the flow-matching loss (ropesp.demo.train's objective, unweighted)
on 4 fixed held-out short-video batches and 4 fixed stream batches, drawn from another seed than training.
Runs of different recipes draw the same training batches up to where the recipes differ (one seed), so
two runs side by side compare recipes, e.g. with and without stream batches.

--adapter RANK: the shipped model's base weights frozen and a fresh stream adapter of rank RANK trained on
stream batches only (ropesp.demo.train --adapter-rank: low-rank deltas of the block linears, on from stream
frame 9); the short videos never reach it (their loss cannot move: checked).
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
from ropesp.demo.world import MOTIONS, take

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
        try:
            out[key] = types[key](value)
        except ValueError:
            raise SystemExit(f"--recipe {item!r}: {key} takes a {types[key].__name__}") from None
    return out


def restrict_stream_prompts(trainer: Trainer, motions: list[str]) -> None:
    """Make `trainer`'s stream batches draw only prompts of `motions` (its short videos keep them all)."""
    keep = torch.tensor([i for i, s in enumerate(trainer.specs) if s.motion in motions])
    subset = [trainer.specs[i] for i in keep], trainer.prompts[keep], take(trainer.scenes, keep)
    everything = trainer.specs, trainer.prompts, trainer.scenes
    draw = trainer.stream_batch

    def stream_batch():
        trainer.specs, trainer.prompts, trainer.scenes = subset
        try:
            return draw()
        finally:
            trainer.specs, trainer.prompts, trainer.scenes = everything

    trainer.stream_batch = stream_batch


def flow_loss(model: torch.nn.Module, batches: list, chunk: int, gates=None) -> list[float]:
    """Flow-matching loss of each batch, per supervised chunk of `chunk` latent frames (in order); gates:
    the model's stream adapter (ropesp.demo.adapter), on where the stream position says."""
    out = []
    with torch.no_grad():
        for b in batches:
            flow = segment_flow(model, b.clean, b.noisy, b.t, b.prompts, b.layout, b.chunks, b.switch, gates)
            err = (flow - (b.eps - b.x0)).pow(2).mean(dim=(0, 2, 3, 4))  # [F]
            out.append([round(float(x), 6) for x in err.view(-1, chunk).mean(dim=1)])
    return out


def mean(rows: list[list[float]]) -> float:
    return round(sum(sum(r) / len(r) for r in rows) / len(rows), 6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--recipe", default="", help="TrainConfig fields over the probe's BASE, 'k=v,k=v'")
    p.add_argument(
        "--stream-motions",
        default=",".join(MOTIONS),
        help="motion classes whose prompts the stream batches draw (default: all)",
    )
    p.add_argument("--adapter", type=int, default=0, metavar="RANK", help="train a rank-RANK adapter only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = {**BASE, "batch": args.batch, **parse_recipe(args.recipe)}
    if args.adapter < 0:
        raise SystemExit(f"--adapter {args.adapter}: a rank >= 1 (0: no adapter)")
    if args.adapter:  # the adapter learns from stream batches only
        recipe.update(adapter_rank=args.adapter, stream_prob=1.0)
    motions = args.stream_motions.split(",")
    if not set(motions) <= set(MOTIONS):
        raise SystemExit(f"--stream-motions {args.stream_motions}: choose from {','.join(MOTIONS)}")
    try:
        held = Trainer(TrainConfig(**{**recipe, "seed": 123}), torch.device("cpu"))
    except ValueError as exc:  # a recipe the trainer refuses, named by its flag
        raise SystemExit(f"--recipe: {exc}") from None
    videos = [held.video_batch() for _ in range(4)]
    streams = [held.stream_batch() for _ in range(4)]
    trainer = Trainer(TrainConfig(**recipe), torch.device("cpu"))
    trainer.init_from(Path(default_checkpoint()), base_only=True)  # the shipped model under its adapter
    if set(motions) != set(MOTIONS):
        restrict_stream_prompts(trainer, motions)
    gates = trainer.gates
    before = (
        flow_loss(trainer.model, videos, trainer.chunk),
        flow_loss(trainer.model, streams, trainer.chunk, gates),
    )
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(0.0)
    after_videos = flow_loss(trainer.model, videos, trainer.chunk, gates)
    after = after_videos, flow_loss(trainer.model, streams, trainer.chunk, gates)
    if gates is not None and after_videos != before[0]:
        raise SystemExit("--adapter: the frozen model's short-video losses moved")
    result = {
        "recipe": {k: recipe[k] for k in sorted(recipe)},
        "stream_motions": motions,
        "adapter_rank": args.adapter,
        "steps": args.steps,
        "video_loss": [mean(before[0]), mean(after[0])],
        "stream_loss": [mean(before[1]), mean(after[1])],
        "video_loss_per_chunk": [
            [round(sum(c) / len(c), 6) for c in zip(*rows, strict=True)] for rows in (before[0], after[0])
        ],
        "train_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
