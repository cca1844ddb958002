"""`ropesp demo`'s options and run: build one warm ropesp.Pipeline, warm it up, serve until Ctrl-C."""

from __future__ import annotations

import argparse
import sys

from ropesp.errors import ConfigError

DEFAULT_WINDOW = 9
"""Rolling attention window (latent frames, sink included) of a stream that runs until stopped, when no
--local-attn-frames is given: three chunks of three frames, the default video of the small models."""
DEFAULT_SINK = 3
"""Sink frames with DEFAULT_WINDOW: the first chunk stays in view."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's own options (the model source options come from the CLI's shared group)."""
    g = p.add_argument_group("run")
    g.add_argument("--engines", help="engine directory from `ropesp build`")
    g.add_argument("--model-dir", help="diffusers Wan2.1 directory (DiT, VAE, umT5)")
    g.add_argument("--text-encoder", help="umT5 directory for text prompts")
    g.add_argument("--backend", choices=["eager", "compile", "ort", "aoti", "tensorrt"])
    g.add_argument("--device", choices=["cuda", "cpu"])
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    g.add_argument(
        "--world-size", type=int, default=1, help="sequence-parallel ranks (started and owned here)"
    )
    g.add_argument("--decoder", choices=["preview", "vae"], default="preview")
    g.add_argument("--height", type=int, help="pixels (multiple of 16)")
    g.add_argument("--width", type=int, help="pixels (multiple of 16)")
    g.add_argument(
        "--local-attn-frames",
        type=int,
        help=f"rolling window in latent frames, sink included (default without --frames: {DEFAULT_WINDOW})",
    )
    g.add_argument("--sink-frames", type=int, help=f"(default with the default window: {DEFAULT_SINK})")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8188, help="TCP port (0: a free one)")
    g.add_argument(
        "--frames", type=int, help="video frames per stream, 4k+1 (default: until the page stops it)"
    )
    g.add_argument(
        "--no-realtime",
        action="store_true",
        help="generate as fast as the model can (default: held to the page's 16 FPS playback)",
    )
    g.add_argument("--jpeg-quality", type=int, default=85, help="frames travel as JPEG (1..95)")


def pipeline_kwargs(args) -> dict:
    """ropesp.Pipeline arguments from the options (an unbounded stream gets the default window)."""
    window, sink = args.local_attn_frames, args.sink_frames
    if args.frames is None and window is None:
        window, sink = DEFAULT_WINDOW, DEFAULT_SINK if sink is None else sink
    if sink is not None and window is None:
        raise ConfigError("--sink-frames needs --local-attn-frames (a rolling window)")
    return {
        "preset": args.preset,
        "checkpoint": args.checkpoint,
        "model_config": args.model_config,
        "model_dir": args.model_dir,
        "engines": args.engines,
        "device": args.device,
        "dtype": args.dtype,
        "backend": args.backend,
        "world_size": args.world_size,
        "decoder": args.decoder,
        "height": args.height,
        "width": args.width,
        "local_attn_frames": -1 if window is None else window,
        "sink_frames": sink or 0,
        "text_encoder": args.text_encoder,
    }


def describe_source(args) -> str:
    source = args.engines or args.checkpoint or args.model_dir or f"{args.preset or 'default'} model"
    return f"{source} · {args.backend or 'default backend'} · {args.world_size} rank(s)"


def run(args) -> None:
    """Serve the demo until SIGINT/SIGTERM; the pipeline (and its ranks) is closed on the way out."""
    import ropesp
    from ropesp.webdemo.server import DemoConfig, DemoServer, check_listen, describe, print_url, warm_up

    config = DemoConfig(
        host=args.host,
        port=args.port,
        frames=args.frames,
        realtime=not args.no_realtime,
        jpeg_quality=args.jpeg_quality,
    )
    kwargs = pipeline_kwargs(args)
    check_listen(config.host, config.port)  # before the model is built
    print("ropesp demo: building the pipeline ...", file=sys.stderr)
    pipe = ropesp.Pipeline(**kwargs)
    try:
        from ropesp.webdemo.prompts import PagePrompts

        prompts = PagePrompts(pipe, config.default_prompt)
        if prompts.reason:
            print(f"ropesp demo: {prompts.note} ({prompts.reason})", file=sys.stderr)
        ms = warm_up(pipe, config.frames, config.default_prompt)
        print(f"ropesp demo: warmed up ({ms:.0f} ms for one chunk)", file=sys.stderr)
        server = DemoServer(pipe, config, describe(pipe) or describe_source(args))
        server.serve_forever(on_ready=print_url)
    finally:
        pipe.close()
    print("ropesp demo: stopped", file=sys.stderr)
