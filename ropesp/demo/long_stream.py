"""Long-stream score of the demo model: does a stream keep the world's objects over 120 latent frames?

    python -m ropesp.demo.long_stream [--checkpoint DIR] [--windows 9/3,6/0,12/3] [--json out.json]
    python -m ropesp.demo.long_stream --windows 9/3 --switches 0 --prompt "two white squares bouncing" --seeds 2104,7

The 32-pair score (ropesp.demo.score) is defined for the 9-latent-frame videos the canonical scenes are made
for. A stream on the demo page runs without end under a rolling window (9 latent frames, 3 of them a sink),
and there the world goes on: "moving" and "bouncing" objects reflect at the borders, "entering" ones cross
the frame and leave again, "leaving" ones are gone. Per latent frame this scores whether the generated
video holds what the world's own video of the same scene holds:

- expected: the objects of the world's scene for the stream's seed (world.seeded_scene) that are inside
  the frame; frames where one of them is partly across a border (within a margin for the generated
  scene's own jitter, `border_margin`) or where two of them touch are not scored;
- held: the decoded keyframe shows exactly that many objects of the prompt's colour, each of the prompt's
  shape (away from the borders), nothing of another colour and less than 5 % junk pixels (score.py's
  labelling). Two objects of one colour that pass through each other form one blob: a blob counts as
  round(area / one object's area) objects (at least one), its shape unchecked.

A stream's score is the fraction of its scored frames that hold; the report gives it per prompt class
(the motion: moving, bouncing, entering, leaving). Prompt switches (the demo page's `set_prompt`, in the
mode of `--prompt-mode`: swap by default, recache or cut) are scored on their own streams: the new
prompt's objects must be there (and the old colour gone) in every frame from the second chunk after the
switch on (`SWITCH_GRACE_CHUNKS`).

`generate_streams` is the one place that drives the runtime (runtime/pipeline.py build_session and
StreamSession); everything else reads latents.
"""

from __future__ import annotations

import argparse
import collections
import math
import time
from dataclasses import asdict, dataclass

import torch

from ropesp.demo.prompts import DemoTextEncoder, describe, parse, prompts_problem
from ropesp.demo.score import (
    EDGE,
    JUNK,
    JUNK_FRACTION,
    MIN_AREA,
    classify_shape,
    components,
    keyframes,
    label_pixels,
)
from ropesp.demo.world import (
    COLOURS,
    DIRECTIONS,
    GRID,
    MAX_SPEED,
    MOTIONS,
    POSITION_JITTER,
    SHAPES,
    SPEED_JITTER,
    SceneSpec,
    object_size,
    seeded_scene,
    trajectories,
    visible_extent,
)
from ropesp.errors import ConfigError, RopespError
from ropesp.output_paths import output_file_problem, write_report
from ropesp.settings import PROMPT_MODES, RunConfig, check_seed

LONG_FRAMES = 120
"""Latent frames of a scored stream: 477 video frames, ~30 s at the demo page's 16 FPS."""
SWITCH_FRAMES = 60
"""Latent frames of a prompt-switch stream."""
SWITCH_CHUNK = 10
"""The chunk before which a switch stream changes its prompt (latent frame 30)."""
SWITCH_GRACE_CHUNKS = 2
"""Chunks after a switch in which the old scene may still fade out; from the next one on the new prompt's
objects must be there and the old ones gone."""
TOUCH_GAP = 1.0
"""Two objects of the world closer than this (latent pixels, Chebyshev gap between their outlines) may
show as one blob: the frame is not scored."""
PER_CLASS = 6
"""Prompts per motion class in the default report."""


@dataclass(frozen=True)
class Window:
    """A rolling attention window of the runtime (latent frames, the sink included)."""

    local_attn_frames: int
    sink_frames: int

    @classmethod
    def parse(cls, text: str) -> Window:
        """'9/3' -> Window(9, 3)."""
        window, _, sink = text.partition("/")
        return cls(int(window), int(sink or 0))

    def __str__(self) -> str:
        return f"{self.local_attn_frames}/{self.sink_frames}"

    def settings(self) -> dict[str, int]:
        """The run settings of this window (local_attn_frames, sink_frames)."""
        return {"local_attn_frames": self.local_attn_frames, "sink_frames": self.sink_frames}


PAGE_WINDOW = Window(9, 3)
"""The demo page's window (ropesp/webdemo/command.py)."""
WINDOWS = (PAGE_WINDOW, Window(6, 0), Window(12, 3))


@dataclass(frozen=True)
class StreamJob:
    """One stream to generate: a prompt and seed, and optionally a switch to another prompt."""

    prompt: str
    seed: int
    frames: int = LONG_FRAMES
    switch_prompt: str | None = None
    switch_chunk: int = SWITCH_CHUNK


# --- what the world shows ---------------------------------------------------------------------------
def border_margin(frame: int, height: int = GRID, width: int = GRID) -> float:
    """How far (latent pixels) a generated object may be from the world's at latent frame `frame`: both
    scenes are the canonical one jittered (world.jittered), so they differ by up to twice the position
    jitter plus twice the speed jitter's drift, and half a pixel of anti-aliasing."""
    scale = max(height, width) / GRID
    return 2 * (POSITION_JITTER + SPEED_JITTER * MAX_SPEED * scale * frame) + 0.5


def expected_counts(spec: SceneSpec, seed: int, frames: int, height: int = GRID, width: int = GRID) -> list:
    """Per latent frame, how many of the prompt's objects the world's video of (spec, seed) shows: an int,
    or None where the frame is not scored (an object partly across a border, or two objects touching)."""
    scene = seeded_scene(spec, seed, height, width)
    centres = trajectories(scene, frames)[0]  # [K, F, 2]
    half = object_size(spec.shape, height, width) / 2
    out: list[int | None] = []
    for f in range(frames):
        margin = border_margin(f, height, width)
        inside, unsure = [], False
        for k in range(spec.count):
            x, y = (float(v) for v in centres[k, f])
            if spec.bounces:  # reflected at the walls: always whole inside
                inside.append((x, y))
                continue
            reach = min(visible_extent(x, half, width), visible_extent(y, half, height))
            if reach >= half + margin:
                inside.append((x, y))
            elif reach > -margin:
                unsure = True
        touching = any(
            max(abs(a[0] - b[0]), abs(a[1] - b[1])) - 2 * half < TOUCH_GAP
            for i, a in enumerate(inside)
            for b in inside[:i]
        )
        out.append(None if unsure or touching else len(inside))
    return out


# --- what the generated video shows -----------------------------------------------------------------
def object_area(shape: str, height: int = GRID, width: int = GRID) -> float:
    """Pixels (at coverage >= 0.5) of one object of `shape`: a square's side squared, a disc's pi r^2."""
    size = object_size(shape, height, width)
    return size * size if shape == "square" else math.pi * size * size / 4


@dataclass(frozen=True)
class FrameCount:
    """What one keyframe shows of a prompt's colour."""

    objects: int
    """Objects of the colour (a blob of several counted by its area)."""
    shapes_ok: bool
    """Every single-object component away from the borders has the prompt's shape."""
    others: int
    """Objects of other colours."""
    junk: float
    """Fraction of junk pixels."""

    def holds(self, expected: int) -> bool:
        return self.miss(expected) is None

    def miss(self, expected: int) -> str | None:
        """Why the frame does not hold `expected` objects (the first check that fails), None if it does:
        "fewer" / "more" objects of the colour, "shape", "other colour", "junk"."""
        if self.objects != expected:
            return "fewer" if self.objects < expected else "more"
        if not self.shapes_ok:
            return "shape"
        if self.others:
            return "other colour"
        return "junk" if self.junk >= JUNK_FRACTION else None


def frame_counts(latents: torch.Tensor, colour: str, shape: str) -> list[FrameCount]:
    """FrameCount of every keyframe of latents [1, F, 16, h, w] for the prompt's colour and shape."""
    frames = keyframes(latents)
    labels, cover = label_pixels(frames)
    f, h, w, _ = frames.shape
    target = list(COLOURS).index(colour) + 1
    one = object_area(shape, h, w)
    out = []
    for i in range(f):
        lab = labels[i]
        own = torch.where((lab == target) | (lab == EDGE), cover[i], torch.zeros_like(cover[i]))
        objects, shapes_ok = 0, True
        for comp in components(lab == target):
            if len(comp) < MIN_AREA:
                continue
            n = max(1, round(len(comp) / one))
            objects += n
            if n == 1:
                found = classify_shape(own, comp[:, 0], comp[:, 1])
                shapes_ok &= found in (None, shape)
        others = sum(
            sum(len(c) >= MIN_AREA for c in components(lab == k))
            for k in range(1, len(COLOURS) + 1)
            if k != target
        )
        out.append(FrameCount(objects, shapes_ok, others, float((lab == JUNK).double().mean())))
    return out


def frame_misses(latents: torch.Tensor, spec: SceneSpec, seed: int) -> list[str | None]:
    """Per latent frame: "" where the video holds the world's objects of (spec, seed), else why not
    (FrameCount.miss); None where the frame is not scored."""
    counts = frame_counts(latents, spec.colour, spec.shape)
    _, _, _, h, w = latents.shape
    expected = expected_counts(spec, seed, len(counts), h, w)
    return [None if e is None else c.miss(e) or "" for c, e in zip(counts, expected, strict=True)]


def held_frames(latents: torch.Tensor, spec: SceneSpec, seed: int) -> list[bool | None]:
    """Per latent frame: whether the video holds the world's objects of (spec, seed); None: not scored."""
    return held_of(frame_misses(latents, spec, seed))


def held_of(misses: list[str | None]) -> list[bool | None]:
    """frame_misses -> held_frames."""
    return [None if m is None else not m for m in misses]


def fraction(held: list[bool | None]) -> float:
    """The fraction of the scored frames that hold (1.0 when none is scored)."""
    scored = [h for h in held if h is not None]
    return sum(scored) / len(scored) if scored else 1.0


def switch_held(latents: torch.Tensor, new: SceneSpec, switch_frame: int, chunk_frames: int) -> list[bool]:
    """Per latent frame from SWITCH_GRACE_CHUNKS chunks after the switch (at `switch_frame`) to the end:
    whether the video holds the new prompt's objects (its count of its colour and shape; `new` must be a
    moving or bouncing scene, whose objects stay inside) and nothing else (the old colour gone)."""
    if not new.bounces:
        raise ValueError(f"{describe(new)!r}: a switch is scored towards a moving or bouncing scene")
    first = switch_frame + SWITCH_GRACE_CHUNKS * chunk_frames
    counts = frame_counts(latents[:, first:], new.colour, new.shape)
    return [c.holds(new.count) for c in counts]


# --- the fixed prompts ------------------------------------------------------------------------------
def long_prompts(per_class: int = PER_CLASS) -> dict[str, list[tuple[str, int]]]:
    """motion class -> its fixed (prompt, seed) pairs: counts, colours, shapes and directions cycled."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    out: dict[str, list[tuple[str, int]]] = {}
    for m, motion in enumerate(MOTIONS):
        pairs = []
        for i in range(per_class):
            direction = None if motion == "bouncing" else directions[(i + m) % len(directions)]
            colour = colours[(3 * m + 2 * i) % len(colours)]
            spec = SceneSpec(i % 3 + 1, colour, SHAPES[(i // 3 + m) % 2], motion, direction)
            pairs.append((describe(spec), 2000 + 100 * m + i))
        out[motion] = pairs
    return out


def long_jobs(per_class: int = PER_CLASS, frames: int = LONG_FRAMES) -> list[StreamJob]:
    """The fixed long streams (long_prompts), every class in MOTIONS order, `frames` latent frames each."""
    return [StreamJob(p, s, frames) for pairs in long_prompts(per_class).values() for p, s in pairs]


def switch_prompts(n: int = 8) -> list[tuple[str, str, int]]:
    """The fixed prompt switches (old prompt, new prompt, seed): every old motion class, towards moving
    and bouncing scenes of another colour, counts and shapes cycled."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    out = []
    for i in range(n):
        motion = MOTIONS[i % len(MOTIONS)]
        old_dir = None if motion == "bouncing" else directions[i % len(directions)]
        old = SceneSpec(i % 3 + 1, colours[i % len(colours)], SHAPES[i % 2], motion, old_dir)
        new_motion = ("moving", "bouncing")[i % 2]
        new_dir = None if new_motion == "bouncing" else directions[(i + 1) % len(directions)]
        new = SceneSpec(
            (i + 1) % 3 + 1, colours[(i + 3) % len(colours)], SHAPES[(i // 2) % 2], new_motion, new_dir
        )
        out.append((describe(old), describe(new), 3000 + i))
    return out


# --- generation: the one call into the runtime ------------------------------------------------------
def generate_streams(config: RunConfig, jobs: list[StreamJob], mapping=None) -> list[torch.Tensor]:
    """Latents [1, F, 16, h, w] of every job, generated by the public runtime API: one session per
    length (runtime.pipeline.build_session of `config`, a RunConfig, with latent_frames set; on a
    rank of a group, `mapping`), `reset(prompt, seed)`, a queued `set_prompt` for a switch (in the mode
    of `config.prompt.prompt_mode`), `generate()` (rank 0's view on a group)."""
    from ropesp.runtime.pipeline import build_session

    encoder, sessions, out = DemoTextEncoder(), {}, []
    for job in jobs:
        if job.frames not in sessions:
            sessions[job.frames] = build_session(config.replace(latent_frames=job.frames), mapping)
        session = sessions[job.frames]
        session.reset(encoder.encode(job.prompt), job.seed)
        if job.switch_prompt is not None:
            session.set_prompt(
                encoder.encode(job.switch_prompt), config.prompt.prompt_mode, at_chunk=job.switch_chunk
            )
        with torch.no_grad():
            out.append(session.generate())
    return out


# --- the report -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamResult:
    prompt: str
    seed: int
    motion: str
    score: float
    """Fraction of the scored frames that hold the world's objects."""
    held: list
    """Per latent frame: 1 held, 0 not, None not scored."""
    misses: dict
    """Frames that do not hold, by the first check they fail (FrameCount.miss)."""


@dataclass(frozen=True)
class SwitchResult:
    old: str
    new: str
    seed: int
    on_time: bool
    """The first frame after the grace chunks holds the new prompt's objects, the old ones gone."""
    score: float
    """Fraction of the frames from there to the end that do."""


def score_streams(latents: list[torch.Tensor], pairs: list[tuple[str, int]]) -> list[StreamResult]:
    out = []
    for x, (prompt, seed) in zip(latents, pairs, strict=True):
        spec = parse(prompt)
        misses = frame_misses(x, spec, seed)
        held = held_of(misses)
        why = collections.Counter(m for m in misses if m)
        out.append(
            StreamResult(
                prompt,
                seed,
                spec.motion,
                fraction(held),
                [None if h is None else int(h) for h in held],
                dict(why),
            )
        )
    return out


def score_switches(
    latents: list[torch.Tensor], switches: list[tuple[str, str, int]], chunk_frames: int
) -> list[SwitchResult]:
    out = []
    for x, (old, new, seed) in zip(latents, switches, strict=True):
        held = switch_held(x, parse(new), SWITCH_CHUNK * chunk_frames, chunk_frames)
        out.append(SwitchResult(old, new, seed, held[0], sum(held) / len(held)))
    return out


def class_means(results: list[StreamResult]) -> dict[str, float]:
    """motion class -> mean stream score, plus 'all'."""
    out = {}
    for motion in MOTIONS:
        scores = [r.score for r in results if r.motion == motion]
        if scores:
            out[motion] = sum(scores) / len(scores)
    out["all"] = sum(r.score for r in results) / max(len(results), 1)
    return out


def class_misses(results: list[StreamResult]) -> dict[str, dict[str, int]]:
    """motion class -> its streams' missed frames by reason (StreamResult.misses), summed."""
    out: dict[str, collections.Counter] = {}
    for r in results:
        out.setdefault(r.motion, collections.Counter()).update(r.misses)
    return {motion: dict(c.most_common()) for motion, c in out.items()}


def evaluate_window(
    config: RunConfig,
    window: Window,
    per_class: int = PER_CLASS,
    frames: int = LONG_FRAMES,
    switches: int = 8,
    pairs: list[tuple[str, int]] | None = None,
) -> dict:
    """Generate and score the fixed long streams (and switch streams) under one window; a JSON-ready dict.
    pairs: (prompt, seed) streams to score instead of the fixed ones (long_prompts)."""
    cfg = config.replace(**window.settings())
    jobs = long_jobs(per_class, frames) if pairs is None else [StreamJob(p, s, frames) for p, s in pairs]
    pairs = [(j.prompt, j.seed) for j in jobs]
    sw = switch_prompts(switches)
    jobs += [StreamJob(old, seed, SWITCH_FRAMES, new) for old, new, seed in sw]
    t0 = time.perf_counter()
    latents = generate_streams(cfg, jobs)
    seconds = time.perf_counter() - t0
    streams = score_streams(latents[: len(pairs)], pairs)
    switched = score_switches(latents[len(pairs) :], sw, cfg.sampler.chunk_frames)
    means = class_means(streams)
    if switched:
        means["switch"] = sum(r.score for r in switched) / len(switched)
        means["switch_on_time"] = sum(r.on_time for r in switched) / len(switched)
    return {
        "window": str(window),
        "frames": frames,
        "means": means,
        "misses": class_misses(streams),
        "generate_seconds": round(seconds, 1),
        "streams": [asdict(r) for r in streams],
        "switches": [asdict(r) for r in switched],
    }


@torch.no_grad()  # scoped, not set_grad_enabled: main may run in a process that trains afterwards
def main(argv: list[str] | None = None) -> None:
    from ropesp.demo import default_checkpoint

    p = argparse.ArgumentParser(prog="python -m ropesp.demo.long_stream", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="demo weights (default: the shipped ones)")
    p.add_argument("--windows", default=",".join(map(str, WINDOWS)), help="rolling windows, e.g. 9/3,6/0")
    p.add_argument("--frames", type=int, default=LONG_FRAMES, help="latent frames per stream")
    p.add_argument("--per-class", type=int, default=PER_CLASS)
    p.add_argument("--switches", type=int, default=8, help="prompt-switch streams per window")
    p.add_argument(
        "--prompt-mode", default="swap", choices=PROMPT_MODES, help="how the switch streams change prompt"
    )
    p.add_argument(
        "--prompt",
        action="append",
        help="score this prompt of the demo grammar (repeatable) instead of the fixed streams, e.g. "
        "'two white squares bouncing'; each with every --seeds seed, each stream's line printed",
    )
    p.add_argument("--seeds", help="seeds of the --prompt streams, comma-separated (default: 2000)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype")
    p.add_argument("--json", help="write the per-stream results here")
    args = p.parse_args(argv)
    for flag, value, least in (("--frames", args.frames, 1), ("--per-class", args.per_class, 0),
                               ("--switches", args.switches, 0)):  # fmt: skip
        if value < least:
            p.error(f"{flag} {value}: at least {least}")
    if not (args.per_class or args.switches or args.prompt):
        p.error("--per-class 0 and --switches 0 leave nothing to score: give one of them, or --prompt")
    try:
        windows = [Window.parse(text) for text in args.windows.split(",")]
    except ValueError:
        p.error(f"--windows {args.windows}: write WINDOW/SINK latent frames, comma-separated, e.g. 9/3,6/0")
    pairs = None
    if args.seeds is not None and not args.prompt:
        p.error(f"--seeds {args.seeds}: seeds of --prompt streams (the fixed streams have their own)")
    if args.prompt:
        try:
            seeds = [check_seed(text) for text in (args.seeds or "2000").split(",")]
        except ConfigError:
            p.error(f"--seeds {args.seeds}: whole numbers in 0..2^63-1, comma-separated, e.g. 2104,7")
        if why := prompts_problem(args.prompt):
            p.error(why)
        pairs = [(prompt, seed) for prompt in args.prompt for seed in seeds]
    if args.json and (problem := output_file_problem(args.json)):
        p.error(problem)
    try:
        config = RunConfig.of(
            checkpoint=args.checkpoint or str(default_checkpoint()),
            device=args.device,
            dtype=args.dtype,
            prompt_mode=args.prompt_mode,
        )
    except RopespError as exc:
        p.error(str(exc))
    from ropesp.runtime.pipeline import resolve

    # every window and length checked before the first stream runs
    checks = [("", config)] + [
        (
            f"--windows {window} / --frames {frames}: ",
            config.replace(latent_frames=frames, **window.settings()),
        )
        for window in windows
        for frames in (args.frames, SWITCH_FRAMES)
    ]
    for context, run in checks:
        try:
            resolve(run)
        except RopespError as exc:
            p.error(context + str(exc))
    report = {
        "checkpoint": config.source.checkpoint,
        "device": args.device,
        "prompt_mode": args.prompt_mode,
        "windows": [],
    }
    for window in windows:
        r = evaluate_window(config, window, args.per_class, args.frames, args.switches, pairs)
        report["windows"].append(r)
        for stream in r["streams"] if pairs else ():
            held = "".join("-" if h is None else ".1"[h] for h in stream["held"])
            print(f"{stream['prompt']} (seed {stream['seed']}): {stream['score']:.3f} {held}", flush=True)
        means = "  ".join(f"{k} {v:.3f}" for k, v in r["means"].items())
        print(
            f"window {r['window']}, {r['frames']} latent frames: {means} ({r['generate_seconds']} s)",
            flush=True,
        )
        for motion, why in r["misses"].items():
            if not why:
                continue
            print(f"  {motion} misses: " + ", ".join(f"{k} {v}" for k, v in why.items()), flush=True)
    if args.json:
        write_report(args.json, report)


if __name__ == "__main__":
    main()
