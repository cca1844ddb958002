"""Steps per second of the demo trainer (ropesp.demo.train), eager against compiled, with where a step's
time goes: drawing the batch (the world's videos, the model's own rollouts), forward + backward, and the
optimizer with the EMA. Every phase is timed between device synchronizations (milliseconds, medians).

    python scripts/train_throughput.py --steps 30 --batch 96 --out tp.json
    python scripts/train_throughput.py --steps 30 --recipe "--stream-prob 1 --rollout-prob 0.75"

`--recipe` takes the trainer's own flags (python -m ropesp.demo.train --help); `--compiled` lists the
variants (eager, compiled).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time

import torch

from ropesp.demo.train import TrainConfig, Trainer, recipe_flag


def recipe(text: str) -> TrainConfig:
    """A TrainConfig from the trainer's flags ("--batch 96 --stream-prob 1")."""
    p = argparse.ArgumentParser(prog="--recipe")
    for f in TrainConfig.__dataclass_fields__:
        default = getattr(TrainConfig, f)
        p.add_argument(recipe_flag(f), dest=f, type=type(default), default=default)
    return TrainConfig(**vars(p.parse_args(shlex.split(text))))


def timed_steps(trainer: Trainer, steps: int, warmup: int) -> dict:
    """Median milliseconds per phase over `steps` steps after `warmup` untimed ones."""
    dev = trainer.device

    def sync() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    phases: dict[str, list[float]] = {"batch": [], "forward_backward": [], "optimizer_ema": [], "step": []}
    draw = {True: trainer.stream_batch, False: trainer.video_batch}
    original = (trainer.stream_batch, trainer.video_batch)
    marks: dict[str, float] = {}

    def timing(stream: bool):
        def inner():
            marks["start"] = sync()
            batch = draw[stream]()
            marks["drawn"] = sync()
            return batch

        return inner

    trainer.stream_batch, trainer.video_batch = timing(True), timing(False)
    backward = torch.Tensor.backward

    def timed_backward(tensor, *args, **kwargs):
        backward(tensor, *args, **kwargs)
        marks["backward"] = sync()

    torch.Tensor.backward = timed_backward
    try:
        for i in range(warmup + steps):
            trainer.train_step(1.0)
            end = sync()
            if i >= warmup:
                phases["batch"].append(marks["drawn"] - marks["start"])
                phases["forward_backward"].append(marks["backward"] - marks["drawn"])
                phases["optimizer_ema"].append(end - marks["backward"])
                phases["step"].append(end - marks["start"])
    finally:
        torch.Tensor.backward = backward
        trainer.stream_batch, trainer.video_batch = original
    out = {k: round(1000 * statistics.median(v), 2) for k, v in phases.items()}
    out["steps_per_s"] = round(1000 / out["step"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="", help="the trainer's flags, e.g. '--batch 96 --stream-prob 1'")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compiles every layout)")
    p.add_argument("--variants", default="eager,compiled", help="eager, compiled (comma-separated)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    cfg = recipe(args.recipe)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for variant in args.variants.split(","):
        start = time.perf_counter()
        trainer = Trainer(cfg, device, compiled=variant == "compiled")
        row = {"variant": variant, **timed_steps(trainer, args.steps, args.warmup)}
        row["wall_s"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "recipe": args.recipe,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
