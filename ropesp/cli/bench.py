"""`ropesp bench`: the optimized paths against the baselines, side by side in one run (ropesp/bench.py)."""

from __future__ import annotations

from ropesp.cli.flags import add_flags, config_from_args
from ropesp.settings import (
    ComputeConfig,
    DecodeConfig,
    ModelSource,
    ParallelConfig,
    SamplerConfig,
    VideoConfig,
)


def add_parser(sub) -> None:
    from ropesp.bench import CONFIGS

    p = sub.add_parser(
        "bench",
        help="time the optimized paths against the baselines in one run",
        description="Time the optimized paths against the baselines in one run, with the latents of every "
        "configuration compared to the first one's (without a model named: the tiny preset on random weights).",
    )
    add_flags(p, ModelSource, exclude=("model_dir",))
    add_flags(p, VideoConfig, help={"frames": "video frames per timed video, 4k+1 (81 = 21 latent frames)"})
    add_flags(p, SamplerConfig)
    add_flags(p, ParallelConfig)
    add_flags(p, ComputeConfig)
    add_flags(
        p,
        DecodeConfig,
        only=("vae", "vae_compile", "vae_fast", "vae_cudnn", "taehv", "decode_device", "early_first_frame"),
        help={
            "vae": "time decode with the Wan VAE: a checkpoint, or 'random' (full size, random weights)",
            "taehv": "time decode with the tiny decoder (TAEHV's taew2_1): a checkpoint, or 'random'",
        },
    )
    g = p.add_argument_group("bench")
    g.add_argument(
        "--configs",
        default="reference,paper-sp,optimized",
        help=f"comma-separated, from: {', '.join(CONFIGS)} (default: reference,paper-sp,optimized)",
    )
    g.add_argument("--warmup", type=int, default=1, help="untimed videos per configuration (default: 1)")
    g.add_argument(
        "--repeat", type=int, default=2, help="timed videos per configuration, median reported (default: 2)"
    )
    g.add_argument("--no-decode", action="store_true", help="time the DiT only (skip the runs with decode)")
    g.add_argument(
        "--alone",
        action="store_true",
        help="run rank 0 of the --world-size group by itself on one GPU, its collectives moving no data: one "
        "rank's compute at that world size (the scaling free communication would give); outputs are wrong",
    )
    g.add_argument("--commit", help="source commit to record when the tree has no git metadata")
    g.add_argument("--json", metavar="PATH", help="write the results as JSON")
    g.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs the [bench] extra: matplotlib)")
    p.set_defaults(run=run)


def run(args) -> None:
    import sys

    from ropesp.bench import BenchConfig
    from ropesp.bench import run as run_bench
    from ropesp.errors import ConfigError
    from ropesp.extras import require, require_backend
    from ropesp.output_paths import output_file_problem
    from ropesp.runtime.pipeline import resolve_rank
    from ropesp.runtime.prompts import default_prompt_embeds

    if vars(args).get("vae") and vars(args).get("taehv"):  # generate's --decoder picks; bench has none
        raise ConfigError("--vae and --taehv: a bench run times one decoder; give one of them")
    config = config_from_args(args)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and (problem := output_file_problem(path, flag)):
            raise ConfigError(problem)  # before minutes of benchmark, not after
    if config.video.unbounded:
        raise ConfigError("--frames 0 (a stream until stopped) is for `ropesp generate`: give a length here")
    bench = BenchConfig(
        run=config.replace(
            vae=None, vae_compile=False, vae_fast=False, vae_cudnn=False, taehv=None, decode_device=None
        ),  # bench's own decoder
        configs=tuple(c for c in args.configs.split(",") if c),
        warmup=args.warmup,
        repeat=args.repeat,
        vae=config.decode.vae,
        vae_compile=config.decode.vae_compile,
        vae_fast=config.decode.vae_fast,
        vae_cudnn=config.decode.vae_cudnn,
        taehv=config.decode.taehv,
        decode_device=config.decode.decode_device,
        decode=not args.no_decode,
        commit=args.commit,
        alone=args.alone,
        json_out=args.json,
        plot_out=args.plot,
        command="ropesp " + " ".join(sys.argv[1:]),
    )
    if args.plot:
        require("bench", "--plot")
    res, mapping = resolve_rank(bench.run, default_model=False)  # the rank environment, read once
    require_backend(res.backend)
    if bench.vae_cudnn:
        require("cudnn", "--vae-cudnn")
    run_bench(bench, default_prompt_embeds(res.model), (res, mapping))
