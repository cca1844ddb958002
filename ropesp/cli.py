"""Command line: argparse -> dataclasses -> one function call per subcommand.

ropesp generate   stream a video from the eager model or built engines
ropesp build      export engines (ONNX / TensorRT / AOTInductor) for a world size
ropesp bench      measure the optimized path against the baselines side by side
ropesp serve-repo write a Triton Inference Server model repository
ropesp serve      start tritonserver on a repository
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from ropesp.config import PRESETS, SamplerConfig
from ropesp.errors import ConfigError, RopespError


def _steps(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--steps {text!r}: expected comma-separated integers in 1..1000, descending (e.g. 1000,750,500,250)"
        ) from None
    try:
        SamplerConfig(steps=values)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return values


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint", help="Self-Forcing .pt, Wan .safetensors (file, index or dir), diffusers dir"
    )
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model-config", help="Wan config.json (when the checkpoint has none beside it)")
    src.add_argument(
        "--preset", choices=sorted(PRESETS), help="named model (random weights without --checkpoint)"
    )


def add_video_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video")
    g.add_argument("--latent-height", type=int)
    g.add_argument("--latent-width", type=int)
    g.add_argument("--height", type=int, help="pixels (multiple of 16); latent = pixels / 8")
    g.add_argument("--width", type=int, help="pixels (multiple of 16); latent = pixels / 8")
    g.add_argument("--latent-frames", type=int)
    g.add_argument("--frames", type=int, help="video frames N = 4*latent_frames - 3")
    g.add_argument("--chunk-frames", type=int, default=3)
    g.add_argument("--independent-first-frame", action="store_true")
    g.add_argument("--max-frames", type=int, help="KV cache capacity in frames (default: the video)")
    g.add_argument("--local-attn-frames", type=int, default=-1, help="rolling window, sink frames included")
    g.add_argument("--sink-frames", type=int, default=0)


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--device", choices=["cuda", "cpu"])
    g.add_argument("--world-size", type=int, help="sequence-parallel ranks (spawned locally unless torchrun)")
    g.add_argument(
        "--sp-rope",
        choices=["local", "allgather"],
        default="local",
        help="local = Causal-RoPE SP; allgather = the paper's baseline",
    )
    g.add_argument(
        "--sp-comm",
        choices=["fused", "unfused"],
        default="fused",
        help="fused = one all-to-all for q,k,v; unfused = three",
    )
    g.add_argument("--backend", choices=["eager", "ort", "aoti", "tensorrt"])
    g.add_argument("--engines", help="engine directory from `ropesp build`")
    g.add_argument("--no-cuda-graphs", action="store_true")


def _latent_sizes(args) -> tuple[int | None, int | None, int | None]:
    lh, lw, lf = args.latent_height, args.latent_width, args.latent_frames
    if args.height is not None or args.width is not None:
        if lh is not None or lw is not None:
            raise ConfigError(
                "give either --height/--width (pixels) or --latent-height/--latent-width, not both"
            )
        for name, px in (("--height", args.height), ("--width", args.width)):
            if px is None or px < 16 or px % 16:
                raise ConfigError(f"{name} {px} must be a positive multiple of 16 pixels (both are needed)")
        lh, lw = args.height // 8, args.width // 8
    if args.frames is not None:
        if lf is not None:
            raise ConfigError("give either --frames or --latent-frames, not both")
        if args.frames < 1 or (args.frames - 1) % 4:
            raise ConfigError(
                f"--frames {args.frames} must be 4*k + 1 video frames (e.g. 81 = 21 latent frames)"
            )
        lf = (args.frames + 3) // 4
    return lh, lw, lf


def pipeline_config(args):
    from ropesp.runtime.pipeline import PipelineConfig

    lh, lw, lf = _latent_sizes(args)
    sampler = SamplerConfig(
        steps=getattr(args, "steps", SamplerConfig.steps),
        shift=getattr(args, "shift", SamplerConfig.shift),
        chunk_frames=args.chunk_frames,
        independent_first_frame=args.independent_first_frame,
    )
    return PipelineConfig(
        checkpoint=args.checkpoint,
        model_config=args.model_config,
        preset=args.preset,
        engines=args.engines,
        backend=args.backend,
        latent_height=lh,
        latent_width=lw,
        latent_frames=lf,
        sampler=sampler,
        max_frames=args.max_frames,
        local_attn_frames=args.local_attn_frames,
        sink_frames=args.sink_frames,
        dtype=args.dtype,
        device=args.device,
        world_size=args.world_size,
        sp_rope=args.sp_rope,
        sp_comm=args.sp_comm,
        cuda_graphs=not args.no_cuda_graphs,
    )


# --- generate ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateOutputs:
    seed: int
    output: str
    latents_out: str | None


def cmd_generate(args) -> None:
    from ropesp.runtime.executor import check_prompt_embeds
    from ropesp.runtime.launch import spawn_ranks, under_launcher
    from ropesp.runtime.prompts import default_prompt_embeds, load_prompt_embeds

    res = pipeline_config(args).resolve()
    if args.prompt_embeds:
        prompt = load_prompt_embeds(args.prompt_embeds)
    else:
        prompt = default_prompt_embeds(res.model)
    check_prompt_embeds(res.model, prompt)
    if res.random_weights:
        name = args.preset or "tiny"
        print(
            f"ropesp: no --checkpoint given: running the {name!r} preset on seeded random weights",
            file=sys.stderr,
        )
    outputs = GenerateOutputs(args.seed, args.output or f"ropesp-{args.seed}.mp4", args.latents_out)
    if res.world_size > 1 and not under_launcher():
        spawn_ranks(res.world_size, _generate_rank, res, prompt, outputs)
    else:
        from ropesp.runtime.dist import Mapping

        _generate_rank(Mapping.from_env(res.world_size), res, prompt, outputs)


def _generate_rank(mapping, res, prompt: torch.Tensor, outputs: GenerateOutputs) -> None:
    from tqdm import tqdm

    from ropesp.decode import PreviewDecoder, video_frames_for
    from ropesp.runtime.launch import process_group
    from ropesp.runtime.pipeline import build_session
    from ropesp.video import Mp4Writer

    lead = mapping.is_first
    with process_group(mapping, res.device):
        session = build_session(res, mapping, decoder=PreviewDecoder() if lead else None)
        session.reset(prompt, outputs.seed)
        latents = []
        writer = Mp4Writer(outputs.output) if lead else None
        try:
            bar = tqdm(
                total=len(session.chunk_sizes), desc="chunks", unit="chunk", disable=not lead, file=sys.stderr
            )
            first_ms = None
            for chunk in session:
                latents.append(chunk.latents)
                if writer is not None:
                    writer.write(chunk.frames[0].numpy())
                first_ms = first_ms if first_ms is not None else chunk.elapsed_ms
                bar.update(1)
            bar.close()
        finally:
            if writer is not None:
                writer.close()
        if not lead:
            return
        total_s = chunk.elapsed_ms / 1e3
        frames = video_frames_for(res.latent_frames)
        print(f"time to first chunk: {first_ms:.1f} ms", file=sys.stderr)
        print(
            f"generated {frames} frames ({res.latent_frames} latent) in {total_s:.2f} s: "
            f"{frames / total_s:.1f} FPS (preview decode included)",
            file=sys.stderr,
        )
        print(f"wrote {outputs.output}", file=sys.stderr)
        if outputs.latents_out:
            torch.save(torch.cat(latents, dim=1), outputs.latents_out)
            print(f"wrote {outputs.latents_out}", file=sys.stderr)


# --- bench ---------------------------------------------------------------------------------
def cmd_bench(args) -> None:
    from ropesp.bench import BenchConfig, run
    from ropesp.runtime.prompts import default_prompt_embeds

    bench = BenchConfig(
        pipeline=pipeline_config(args),
        configs=tuple(c for c in args.configs.split(",") if c),
        warmup=args.warmup,
        repeat=args.repeat,
        json_out=args.json,
        plot_out=args.plot,
        command="ropesp " + " ".join(sys.argv[1:]),
    )
    res = bench.pipeline.resolve()
    run(bench, default_prompt_embeds(res.model))


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the optimized path against the baselines in one run")
    add_model_args(p)
    add_video_args(p)
    add_run_args(p)
    p.add_argument("--configs", default="reference,paper-sp,optimized",
                   help="comma-separated: reference, paper-sp, optimized, compiled")
    p.add_argument("--warmup", type=int, default=1, help="untimed videos per configuration")
    p.add_argument("--repeat", type=int, default=2, help="timed videos per configuration (median)")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--plot", help="write a PNG plot")
    p.set_defaults(func=cmd_bench)


# --- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropesp", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a video chunk by chunk")
    add_model_args(gen)
    add_video_args(gen)
    add_run_args(gen)
    gen.add_argument("--prompt-embeds", help=".pt tensor [L, text_dim] / [1, L, text_dim] or .safetensors")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--shift", type=float, default=5.0)
    gen.add_argument(
        "--steps",
        type=_steps,
        default=(1000, 750, 500, 250),
        help="denoising steps before warping, e.g. 1000,750,500,250",
    )
    gen.add_argument("--latents-out", help="write the final latents [B, F, C, H, W] with torch.save")
    gen.add_argument("--output", help="MP4 path (default ropesp-<seed>.mp4)")
    gen.set_defaults(func=cmd_generate)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except RopespError as exc:
        print(f"ropesp: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
