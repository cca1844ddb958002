"""Steps per second of the demo trainer (ropesp.demo.train), eager against compiled, with where a step's
time goes: drawing the batch (the world's videos, the model's own rollouts) and learning from it
(forward, backward, optimizer, EMA). Each phase is timed between device synchronizations (milliseconds,
medians).

    python scripts/train_throughput.py --steps 30 --recipe "--batch 96" --out tp.json
    python scripts/train_throughput.py --steps 30 --recipe "--stream-prob 1 --rollout-prob 0.75"

`--recipe` takes the trainer's own flags (python -m ropesp.demo.train --help); `--variants` lists what
runs (eager, compiled).
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
    """Median milliseconds per phase over `steps` steps after `warmup` untimed ones: drawing the batch
    (`Trainer.draw`) and learning from it (`Trainer.learn`: forward, backward, optimizer, EMA)."""
    dev = trainer.device

    def sync() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    phases: dict[str, list[float]] = {"batch": [], "learn": [], "step": []}
    for i in range(warmup + steps):
        start = sync()
        batch, stream = trainer.draw()
        drawn = sync()
        trainer.learn(batch, stream, 1.0)
        end = sync()
        if i >= warmup:
            phases["batch"].append(drawn - start)
            phases["learn"].append(end - drawn)
            phases["step"].append(end - start)
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
    variants = args.variants.split(",")
    if unknown := set(variants) - {"eager", "compiled"}:
        p.error(f"--variants {args.variants}: unknown {sorted(unknown)}; choose from eager, compiled")
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps {args.steps} / --warmup {args.warmup}: at least 1 timed step, warm-up >= 0")
    cfg = recipe(args.recipe)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for variant in variants:
        start = time.perf_counter()
        try:
            trainer = Trainer(cfg, device, compiled=variant == "compiled")
        except ValueError as exc:
            p.error(f"--recipe {args.recipe!r}: {exc}")
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
