"""Does the demo model lose a prompt's objects in one chunk, or only over its own rollouts?

    python scripts/demo_one_chunk_probe.py --prompt "two white squares bouncing" [--prompt ...] [--checkpoint DIR]

For each prompt, far-into-the-stream samples of the trainer's stream batches (segments.py, the page's
window 9/3) whose context chunks are the world's own, each supervised chunk generated once by the runtime's
4-step sampler against that context (the trainer's `own_context`, Self-Forcing's rollout of one chunk).
Per generated latent frame, whether it holds the prompt's objects (count, colour, shape: the long-stream
score's test, ropesp.demo.long_stream.frame_counts), counted where the world's own frame holds. A class
that holds here and not in `ropesp.demo.long_stream` loses its objects over the model's own rollouts
(exposure bias); one that misses here too loses them within one chunk, with a perfect context.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from ropesp.demo import default_checkpoint
from ropesp.demo.long_stream import frame_counts, object_area
from ropesp.demo.prompts import describe, parse, prompts_problem
from ropesp.demo.score import EDGE, MIN_AREA, components, keyframes, label_pixels
from ropesp.demo.train import TrainConfig, Trainer
from ropesp.demo.world import COLOURS, SHAPES
from ropesp.output_paths import output_file_problem


def read_adapter(checkpoint: Path) -> dict[str, int]:
    """The TrainConfig fields of a demo checkpoint directory's model (adapter_rank, adapter_from, dim,
    num_layers); ValueError if it has no adapter."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"no readable config.json ({type(exc).__name__})") from None
    if not config.get("stream_rank"):
        raise ValueError("its model has no stream adapter (stream_rank 0): probe one that streams")
    return {
        "adapter_rank": int(config["stream_rank"]),
        "adapter_from": int(config["stream_from_frame"]),
        "dim": int(config["dim"]),
        "num_layers": int(config["num_layers"]),
    }


def probe(checkpoint: Path, prompt: str, batch: int, batches: int, seed: int) -> dict:
    """{prompt, held, scored, misses}: generated frames that hold the prompt's objects, of those where
    the world's frame holds, and why the others miss (FrameCount.miss)."""
    cfg = TrainConfig(
        batch=batch,
        **read_adapter(checkpoint),
        stream_prob=1.0,
        rollout_prob=1.0,
        stream_windows="9/3",
        far_prob=1.0,
        seed=seed,
    )
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.init_from(checkpoint)
    spec = parse(prompt)
    index = [describe(s) for s in trainer.specs].index(describe(spec))
    trainer.stream_spec_p = torch.nn.functional.one_hot(torch.tensor(index), len(trainer.specs)).float()
    held, scored, misses = 0, 0, Counter()
    where: dict[str, Counter] = {}
    for _ in range(batches):
        sample = trainer.stream_batch()
        made, world = sample.clean[:, -sample.x0.shape[1] :], sample.x0  # [B, F, 16, h, w] each
        for i in range(made.shape[0]):
            truth = frame_counts(world[i : i + 1], spec.colour, spec.shape)
            ours = frame_counts(made[i : i + 1], spec.colour, spec.shape)
            places = world_places(world[i : i + 1], spec.colour)
            for w, g, place in zip(truth, ours, places, strict=True):
                if w.holds(spec.count):
                    scored += 1
                    why = g.miss(spec.count)
                    held += why is None
                    misses[why or "held"] += 1
                    where.setdefault(place, Counter())[why or "held"] += 1
    return {
        "prompt": prompt,
        "held": held,
        "scored": scored,
        "misses": dict(misses),
        "where": {k: dict(v) for k, v in sorted(where.items())},
    }


def world_places(latents: torch.Tensor, colour: str) -> list[str]:
    """Per keyframe of the world's latents [1, F, 16, h, w], where its objects of `colour` are: "touching"
    (two or more in one component), else "border" (one within BORDER_PX of the frame's edge), else "free"."""
    frames = keyframes(latents)
    labels, _ = label_pixels(frames)
    target = list(COLOURS).index(colour) + 1
    h, w = labels.shape[1:]
    one = min(object_area(shape, h, w) for shape in SHAPES)
    out = []
    for lab in labels:
        comps = [c for c in components((lab == target) | (lab == EDGE)) if len(c) >= MIN_AREA]
        if any(len(c) > 1.5 * one for c in comps):
            out.append("touching")
        elif any(
            int(c[:, 0].min()) < BORDER_PX
            or int(c[:, 1].min()) < BORDER_PX
            or int(c[:, 0].max()) >= h - BORDER_PX
            or int(c[:, 1].max()) >= w - BORDER_PX
            for c in comps
        ):
            out.append("border")
        else:
            out.append("free")
    return out


BORDER_PX = 2
"""An object this close (latent pixels) to the frame's edge counts as at the border (where it bounces)."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint", default=str(default_checkpoint()), help="demo weights with a stream adapter"
    )
    p.add_argument(
        "--prompt", action="append", required=True, help="a prompt of the demo grammar (repeatable)"
    )
    p.add_argument("--batch", type=int, default=24, help="samples per batch")
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    for flag, value in (("--batch", args.batch), ("--batches", args.batches)):
        if value < 1:
            p.error(f"{flag} {value}: at least 1")
    if why := prompts_problem(args.prompt):
        p.error(why)
    if args.json and (why := output_file_problem(args.json)):
        p.error(why)
    try:
        read_adapter(Path(args.checkpoint))
    except ValueError as exc:
        p.error(f"--checkpoint {args.checkpoint}: {exc}")
    torch.set_grad_enabled(False)
    results = []
    for prompt in args.prompt:
        r = probe(Path(args.checkpoint), prompt, args.batch, args.batches, args.seed)
        results.append(r)
        print(
            f"{prompt}: {r['held'] / r['scored']:.3f} of {r['scored']} frames held {r['misses']}", flush=True
        )
        for place, counts in r["where"].items():
            n = sum(counts.values())
            print(f"  {place}: {counts.get('held', 0) / n:.3f} of {n} {counts}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "results": results}, indent=1))


if __name__ == "__main__":
    main()
