"""Objects per frame in a long stream of the demo model, against the world's own video of the same scene.

    python scripts/demo_long_stream.py --latent-frames 120 --local-attn-frames 9 --sink-frames 3 [--json F]

Prints, per latent frame, how many objects of the prompt's colour the generated video shows (a blob of
several counted by its area), how many the world's video shows (`.`: not scored) and whether the frame
holds the world's objects (ropesp.demo.long_stream; the score over fixed prompts per class:
`python -m ropesp.demo.long_stream`).
"""

from __future__ import annotations

import argparse
import json

import torch

from ropesp.demo import default_checkpoint
from ropesp.demo.long_stream import StreamJob, expected_counts, fraction, frame_counts, generate_streams
from ropesp.demo.prompts import parse
from ropesp.settings import RunConfig

PROMPTS = ("a red square moving right", "two blue discs bouncing", "three green squares moving left")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent-frames", type=int, default=120)
    p.add_argument("--local-attn-frames", type=int, default=9)
    p.add_argument("--sink-frames", type=int, default=3)
    p.add_argument("--checkpoint", default=str(default_checkpoint()))
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--prompt", action="append", help="prompts to stream (default: three fixed ones)")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    cfg = RunConfig.of(
        checkpoint=args.checkpoint,
        device="cpu",
        dtype="float32",
        local_attn_frames=args.local_attn_frames,
        sink_frames=args.sink_frames,
    )
    prompts = args.prompt or PROMPTS
    jobs = [StreamJob(prompt, args.seed, args.latent_frames) for prompt in prompts]
    rows = []
    for job, latents in zip(jobs, generate_streams(cfg, jobs)):
        spec = parse(job.prompt)
        counts = frame_counts(latents, spec.colour, spec.shape)
        world = expected_counts(spec, job.seed, len(counts))
        held = [None if w is None else c.holds(w) for c, w in zip(counts, world)]
        rows.append(
            {
                "prompt": job.prompt,
                "generated": [c.objects for c in counts],
                "world": world,
                "held": held,
                "score": fraction(held),
            }
        )
        print(f"{job.prompt}: {fraction(held):.2f} of the scored frames hold the world's objects")
        print("  generated " + "".join(str(c.objects) for c in counts))
        print("  world     " + "".join("." if w is None else str(w) for w in world))
        print("  held      " + "".join("." if h is None else str(int(h)) for h in held))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.to_dict(), "prompts": rows}, f, indent=1)


if __name__ == "__main__":
    main()
