"""`ropesp demo`'s run: build one warm ropesp.Pipeline (the engine behind the page), warm it up, serve
until Ctrl-C or SIGTERM."""

from __future__ import annotations

import sys

from ropesp.settings import RunConfig


def run(config: RunConfig, *, host: str, port: int, jpeg_quality: int) -> None:
    """Serve the demo until SIGINT/SIGTERM; the pipeline (and its ranks) is closed on the way out."""
    import ropesp
    from ropesp.webdemo.prompts import PagePrompts
    from ropesp.webdemo.server import DemoConfig, DemoServer, check_listen, print_url, warm_up

    frames = config.video.frames
    demo = DemoConfig(
        host=host,
        port=port,
        frames=frames if frames else None,
        realtime=config.streams.realtime_fps > 0,
        jpeg_quality=jpeg_quality,
    )
    check_listen(demo.host, demo.port)  # before the model is built
    from ropesp.runtime.pipeline import resolve

    resolve(config)  # every setting checked (a page's --frames too) and named as a flag, before any work
    print("ropesp demo: building the pipeline ...", file=sys.stderr)
    pipe = ropesp.Pipeline.from_config(config.replace(frames=None))  # each page asks for its own length
    try:
        prompts = PagePrompts(pipe, demo.default_prompt)
        if prompts.reason:
            print(f"ropesp demo: {prompts.note} ({prompts.reason})", file=sys.stderr)
        # on a GPU every slot's CUDA graphs are captured now, not while a page waits for its first frame
        ms = warm_up(pipe, demo.frames, demo.default_prompt)
        print(
            f"ropesp demo: warmed up in {ms:.0f} ms, {pipe.max_streams} streams at once",
            file=sys.stderr,
        )
        server = DemoServer(pipe, demo, pipe.description())
        server.serve_forever(on_ready=print_url)
    finally:
        pipe.close()
    print("ropesp demo: stopped", file=sys.stderr)
