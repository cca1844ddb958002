"""Objects per frame in a long stream of the demo model, against the world's own video of the same scene.

    python scripts/demo_long_stream.py --latent-frames 30 --local-attn-frames 9 --sink-frames 3 [--json F]

The quality score (ropesp.demo.score) is defined for the 9-latent-frame videos the canonical scenes are made
for; over a longer video a "moving" object bounces back and an entering one leaves again, which no prompt
describes. What a stream longer than its training videos must still do is keep its objects: this prints, per
latent frame, how many objects of the prompt's colour the generated video and the world's video show.
"""

from __future__ import annotations

import argparse
import json

import torch

from ropesp.demo import DemoTextEncoder, default_checkpoint
from ropesp.demo.prompts import parse
from ropesp.demo.score import find_objects, keyframes, label_pixels
from ropesp.demo.world import scene_latents, seeded_scene
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

PROMPTS = ("a red square moving right", "two blue discs bouncing", "three green squares moving left")


def counts(latents: torch.Tensor, colour: str) -> list[int]:
    """Objects of `colour` in each keyframe of latents [1, F, 16, h, w]."""
    frames = keyframes(latents)
    labels, cover = label_pixels(frames)
    return [len(find_objects(frames[i], labels[i], cover[i], colour).centres) for i in range(len(frames))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latent-frames", type=int, default=30)
    p.add_argument("--local-attn-frames", type=int, default=9)
    p.add_argument("--sink-frames", type=int, default=3)
    p.add_argument("--checkpoint", default=str(default_checkpoint()))
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    cfg = RunConfig.of(
        checkpoint=args.checkpoint,
        device="cpu",
        dtype="float32",
        latent_frames=args.latent_frames,
        local_attn_frames=args.local_attn_frames,
        sink_frames=args.sink_frames,
    )
    session, encoder, rows = build_session(cfg), DemoTextEncoder(), []
    for prompt in PROMPTS:
        spec = parse(prompt)
        session.reset(encoder.encode(prompt), args.seed)
        generated = counts(session.generate(), spec.colour)
        world = counts(scene_latents(seeded_scene(spec, args.seed), args.latent_frames)[:1], spec.colour)
        kept = sum(g == w for g, w in zip(generated, world)) / len(world)
        rows.append({"prompt": prompt, "generated": generated, "world": world, "frames_matching": kept})
        print(f"{prompt}: {kept:.2f} of the frames show the world's count")
        print("  generated " + " ".join(map(str, generated)))
        print("  world     " + " ".join(map(str, world)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.to_dict(), "prompts": rows}, f, indent=1)


if __name__ == "__main__":
    main()
