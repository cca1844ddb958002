"""A strip of frames from 30 s streams of two demo checkpoints beside the world's own video (PNG).

    python scripts/demo_long_strip.py --old OLD_DIR --new NEW_DIR --out docs/long_stream_strip.png

Each prompt streams 120 latent frames (477 video frames, ~30 s at the page's 16 FPS) under the demo page's
window (--local-attn-frames 9 --sink-frames 3) through the runtime (ropesp.demo.long_stream.generate_streams);
the strip shows every 15th latent frame's video frame, framed green where the long-stream score counts the
frame as holding the world's objects, red where not, grey where the frame is not scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from ropesp.decode.preview import PreviewDecoder
from ropesp.demo.long_stream import LONG_FRAMES, PAGE_WINDOW, StreamJob, generate_streams, held_frames
from ropesp.demo.prompts import parse
from ropesp.demo.world import scene_latents, seeded_scene
from ropesp.settings import RunConfig

PROMPTS = (
    ("a red square moving right", 101),
    ("two blue discs bouncing", 102),
    ("a green disc entering from the left", 103),
    ("three yellow squares leaving to the top", 104),
)
SHOWN = tuple(range(0, LONG_FRAMES, 15)) + (LONG_FRAMES - 1,)
"""Latent frames shown (video frame 4k of latent frame k)."""
BORDER = {True: (40, 200, 40), False: (220, 40, 40), None: (150, 150, 150)}


def row(latents: torch.Tensor, held: list) -> np.ndarray:
    """The SHOWN frames of a stream side by side, each framed by whether it holds the world's objects."""
    video = PreviewDecoder().decode(latents)[0].numpy()  # [4F - 3, H, W, 3]
    tiles = []
    for k in SHOWN:
        tile = np.pad(video[4 * k], ((3, 3), (3, 3), (0, 0)))
        tile[:3], tile[-3:], tile[:, :3], tile[:, -3:] = (
            BORDER[None if held[k] is None else bool(held[k])],
        ) * 4
        tiles += [tile, np.full((tile.shape[0], 4, 3), 255, np.uint8)]
    return np.concatenate(tiles[:-1], axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", required=True, help="checkpoint directory of the earlier weights")
    p.add_argument("--new", required=True, help="checkpoint directory of the new weights")
    p.add_argument("--old-label", default="old weights")
    p.add_argument("--new-label", default="new weights")
    p.add_argument("--out", default="docs/long_stream_strip.png")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    jobs = [StreamJob(prompt, seed, LONG_FRAMES) for prompt, seed in PROMPTS]
    streams = {}
    for name, checkpoint in (("old", args.old), ("new", args.new)):
        cfg = RunConfig.of(
            checkpoint=checkpoint,
            device="cpu",
            dtype="float32",
            local_attn_frames=PAGE_WINDOW.local_attn_frames,
            sink_frames=PAGE_WINDOW.sink_frames,
        )
        streams[name] = generate_streams(cfg, jobs)
    fig, axes = plt.subplots(3 * len(PROMPTS), 1, figsize=(12, 1.55 * 3 * len(PROMPTS)))
    for i, (prompt, seed) in enumerate(PROMPTS):
        spec = parse(prompt)
        world = scene_latents(seeded_scene(spec, seed), LONG_FRAMES)
        for j, (label, latents) in enumerate(
            (("world", world), (args.old_label, streams["old"][i]), (args.new_label, streams["new"][i]))
        ):
            held = held_frames(latents, spec, seed)
            ax = axes[3 * i + j]
            ax.imshow(row(latents, held))
            scored = [h for h in held if h is not None]
            ax.set_title(
                f'"{prompt}", {label}: {sum(scored) / len(scored):.2f} of the frames hold', fontsize=8
            )
            ax.axis("off")
    fig.suptitle(
        f"latent frames {', '.join(map(str, SHOWN))} of 120 (video frames 4k), window {PAGE_WINDOW}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
