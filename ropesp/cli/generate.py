"""`ropesp generate`: one stream from the engine into files (a fragmented MP4, PNG frames, latents).

The command parses, encodes the prompts, opens one stream on the engine core and writes each chunk as
it arrives; the engine starts and owns the ranks. Ctrl-C and SIGTERM stop every rank: a bounded video is
discarded (the directory is left as it was), an unbounded one (--frames 0) is finished after the chunk in
progress (a second signal discards it).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ropesp import start_gc
from ropesp.cli.flags import add_flags, config_from_args
from ropesp.errors import ConfigError
from ropesp.settings import (
    ComputeConfig,
    DecodeConfig,
    ModelSource,
    ParallelConfig,
    PromptConfig,
    SamplerConfig,
    VideoConfig,
    check_seed,
)

DEMO_EPILOG = (
    "The embedded demo model (the default without --checkpoint/--preset/--engines) knows prompts of the form "
    "COUNT COLOUR SHAPE MOTION: COUNT a|one|two|three; COLOUR red|green|blue|yellow|white|cyan|magenta; "
    "SHAPE square|disc (squares|discs); MOTION moving left|right|up|down | bouncing | entering from the "
    "left|right|top|bottom | leaving to the left|right|top|bottom. E.g. 'two blue discs bouncing', 'three "
    "white squares entering from the top'."
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="stream a video chunk by chunk into an MP4",
        description="Stream a video chunk by chunk into a fragmented MP4 (playable while it is written).",
        epilog=DEMO_EPILOG,
    )
    for section in (ModelSource, VideoConfig, SamplerConfig, ParallelConfig, ComputeConfig, DecodeConfig):
        add_flags(p, section)
    add_flags(p, PromptConfig)
    g = p.add_argument_group("generate")
    text = g.add_mutually_exclusive_group()
    text.add_argument(
        "--prompt",
        help="text prompt, encoded once by the model's text encoder (the demo model's own, or umT5 from "
        "--text-encoder / --model-dir); default: 'a red square moving right' for the demo model",
    )
    text.add_argument(
        "--prompt-embeds", metavar="PATH", help=".pt tensor [L, text_dim] / [1, L, text_dim] or .safetensors"
    )
    g.add_argument(
        "--prompt-at",
        nargs=2,
        action="append",
        metavar=("CHUNK", "PROMPT"),
        help="from chunk CHUNK (>= 1; chunks of --chunk-frames latent frames, 0 the first) on, use PROMPT: text "
        "with --prompt, an embeddings file with --prompt-embeds; repeat for a schedule, e.g. --prompt 'a fox' "
        "--prompt-at 4 'the fox jumps'",
    )
    g.add_argument("--seed", default="0", help="noise seed, an integer in 0..2^63-1 (default: 0)")
    g.add_argument(
        "--output",
        metavar="PATH",
        help="MP4 path (default: ropesp-SEED.mp4, or ropesp-SEED-N.mp4 with the first N free); written as "
        "OUTPUT.<random>.part (playable while written) and renamed when the run succeeds",
    )
    g.add_argument(
        "--frames-dir", metavar="DIR", help="also write each frame as DIR/frame_NNNNNN.png as it arrives"
    )
    g.add_argument(
        "--latents-out", metavar="PATH", help="write the final latents [1, F, C, h, w] with torch.save (.pt)"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output/--latents-out (only when the run succeeds) and delete old "
        "frame_*.png in --frames-dir",
    )
    p.set_defaults(run=run)


def default_output(seed: int) -> str:
    """ropesp-SEED.mp4, or ropesp-SEED-N.mp4 with the smallest N that names no file yet: a name ropesp
    chooses never replaces an earlier run's video."""
    name = f"ropesp-{seed}.mp4"
    n = 0
    while Path(name).exists():
        n += 1
        name = f"ropesp-{seed}-{n}.mp4"
    return name


def prompt_changes(pairs) -> list[tuple[int, str]]:
    """--prompt-at CHUNK PROMPT pairs, checked: chunk indices >= 1, each once, in order."""
    changes = []
    for chunk, value in pairs or []:
        try:
            k = int(chunk)
        except ValueError:
            raise ConfigError(f"--prompt-at {chunk!r} {value!r}: CHUNK must be an integer >= 1") from None
        if k < 1:
            raise ConfigError(f"--prompt-at {k}: CHUNK must be >= 1 (chunk 0 takes --prompt/--prompt-embeds)")
        changes.append((k, value))
    chunks = [k for k, _ in changes]
    if len(set(chunks)) != len(chunks):
        raise ConfigError(f"--prompt-at chunks {chunks}: each chunk may change the prompt once")
    return sorted(changes)


def encode_prompts(args, res):
    """(first prompt, [(chunk, prompt)]) as float32 embeddings: texts through the run's text encoder
    (freed afterwards), files read, or the model's default prompt."""
    from ropesp.demo import DEFAULT_PROMPT
    from ropesp.runtime.prompts import PromptEncoder, default_prompt_embeds, load_prompt_embeds

    changes = prompt_changes(args.prompt_at)
    encoder = PromptEncoder(res)
    if args.prompt is not None and not encoder.takes_text:
        raise ConfigError(
            "--prompt needs a text encoder: pass --text-encoder DIR (umT5: text_encoder/ + tokenizer/) or "
            "--model-dir DIR, or give --prompt-embeds PATH instead"
        )
    if args.prompt_embeds:
        first = load_prompt_embeds(args.prompt_embeds)
        later = [(k, load_prompt_embeds(v, f"--prompt-at {k}")) for k, v in changes]
        return first, later
    if args.prompt is None and not (encoder.takes_text and encoder.choice.builtin):
        if changes:
            raise ConfigError("--prompt-at needs --prompt TEXT or --prompt-embeds PATH for the first chunk")
        return default_prompt_embeds(res.model), []
    texts = [DEFAULT_PROMPT if args.prompt is None else args.prompt, *(v for _, v in changes)]
    t0 = time.perf_counter()

    def loading(model_dir) -> None:
        print(f"ropesp: encoding the prompt with umT5 from {model_dir}", file=sys.stderr)

    try:
        embeds = [encoder(text, loading) for text in texts]
    finally:
        encoder.free()
    if encoder.choice.builtin:
        print(f"ropesp: prompt {texts[0]!r} (demo encoder)", file=sys.stderr)
    else:
        print(f"encoded {len(texts)} prompt(s) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return embeds[0], list(zip([k for k, _ in changes], embeds[1:], strict=True))


@contextlib.contextmanager
def signals(stream, unbounded: bool) -> Iterator[None]:
    """Ctrl-C and SIGTERM alike: an unbounded stream ends after the chunk in progress (the video so far
    is kept); a bounded one, or a second signal, stops now (exit 130 / 143, nothing written)."""
    from ropesp.cli import Interrupted

    asked: list[int] = []

    def handle(signum, _frame) -> None:
        code = 128 + signum
        if unbounded and not asked:
            asked.append(code)
            print("\nropesp: stopping after this chunk (Ctrl-C again to abort)", file=sys.stderr)
            stream.cancel()
            return
        raise Interrupted(code)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args) -> None:
    from ropesp.extras import require_backend
    from ropesp.run_status import announce, model_notes
    from ropesp.runtime.engine_core import EngineCore
    from ropesp.runtime.executor import check_prompt_embeds
    from ropesp.runtime.pipeline import resolve_rank
    from ropesp.video import check_outputs, import_writer_in_background

    seed = check_seed(args.seed)
    config = config_from_args(args)
    if config.prompt.text_encoder and args.prompt is None:
        raise ConfigError("--text-encoder is only used with --prompt TEXT")
    # this process's place in the group: read from the launcher's environment once, passed down
    res, mapping = resolve_rank(config.replace(max_streams=1))
    if mapping.rank != 0:  # a follower under torchrun: the leader (rank 0) runs the stream
        EngineCore(res, mapping).start()
        return
    if res.decoder == "none":
        raise ConfigError(
            "--decoder none makes no frames: generate writes a video (use --decoder preview, vae or taehv)"
        )
    changes = prompt_changes(args.prompt_at)
    chunks = None if res.unbounded else len(res.chunk_sizes())
    if chunks is not None and changes and changes[-1][0] >= chunks:
        where = {1: "no later chunk to change the prompt at", 2: "a change comes at chunk 1"}
        raise ConfigError(
            f"--prompt-at {changes[-1][0]}: the video has {chunks} chunk{'s' * (chunks != 1)}; "
            + where.get(chunks, f"a change comes at chunks 1..{chunks - 1}")
        )
    # before any work (prompt encoding, model loading): a bad path must not cost a whole video
    paths = check_outputs(
        args.output or default_output(seed), args.latents_out, args.frames_dir, args.overwrite
    )
    require_backend(res.backend)
    import_writer_in_background()  # while the engine starts
    first, changes = encode_prompts(args, res)
    for embeds in (first, *(e for _, e in changes)):
        check_prompt_embeds(res.model, embeds)  # before the engine starts
    for line in model_notes(res):
        print(line, file=sys.stderr)
    announce(res, sys.stderr)
    core = EngineCore(res, mapping).start()
    with core:
        latent_frames = None if res.unbounded else res.latent_frames
        request = core.request(
            first, seed, latent_frames, changes=changes, change_mode=config.prompt.prompt_mode
        )
        decode = f" on {config.decode.decode_device}" if config.decode.decode_device else ""
        mode = "overlapped with the DiT" if core.overlapped else "after each chunk"
        print(f"decoder: {res.decoder}{decode} ({mode})", file=sys.stderr)
        stream = core.open(request)
        write(stream, paths, res, request.latent_frames)


def write(stream, paths, res, latent_frames: int | None) -> None:
    """The stream into its files, with a progress bar and the run's figures."""
    import torch
    from tqdm import tqdm

    from ropesp.decode import video_frames_for
    from ropesp.video import StreamOutputs

    unbounded = latent_frames is None
    total = None if unbounded else len(res.chunk_sizes(latent_frames))
    keep = paths.latents is not None
    latents, first_ms, total_ms, frames_done = [], None, 0.0, 0
    with StreamOutputs(paths) as out, signals(stream, unbounded):
        print(f"writing {out.part_path} (playable while written)", file=sys.stderr)
        if unbounded:
            print("streaming until Ctrl-C", file=sys.stderr)
        with tqdm(total=total, desc="chunks", unit="chunk", file=sys.stderr) as bar:
            for chunk in stream:
                out.write(chunk.frames[0].numpy())
                start_gc.release()  # the process has started: collect again (ropesp/start_gc.py)
                if keep:
                    latents.append(chunk.latents)
                first_ms = chunk.elapsed_ms if first_ms is None else first_ms
                total_ms = chunk.elapsed_ms
                frames_done += chunk.latents.shape[1]
                bar.update(1)
        out.commit(torch.cat(latents, dim=1) if keep and latents else None)
    frames = video_frames_for(frames_done)
    seconds = max(total_ms / 1e3, 1e-9)
    print(f"time to first chunk: {first_ms or 0.0:.1f} ms", file=sys.stderr)
    print(
        f"generated {frames} frames ({frames_done} latent) in {seconds:.2f} s: {frames / seconds:.1f} FPS "
        f"({res.decoder} decode included)",
        file=sys.stderr,
    )
    print(f"wrote {paths.video}", file=sys.stderr)
    if paths.latents:
        print(f"wrote {paths.latents}", file=sys.stderr)
    if paths.frames_dir:
        print(f"wrote {frames} PNG frames to {paths.frames_dir}", file=sys.stderr)
