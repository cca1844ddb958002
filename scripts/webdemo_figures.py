"""Measure `ropesp demo` as a person sees it: time to first frame and steady on-screen FPS in headless
Chromium, against the same pipeline's own streaming FPS (no page) in the same process.

    python scripts/webdemo_figures.py --json bench/2026-12-01-web/demo_cpu.json [--height 256 --width 256]

Needs the [demo] and [test] extras (playwright) and Debian's chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

import torch

import ropesp
from ropesp.webdemo.prompts import PagePrompts
from ropesp.webdemo.server import DEFAULT_PROMPT, DemoConfig, DemoServer, warm_up

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def pipeline_fps(pipe, chunks: int) -> dict:
    """Frames per second of the pipeline's own stream (iteration only, as `generate` reports it)."""
    encode = PagePrompts(pipe, DEFAULT_PROMPT)
    frames, t0, first = 0, time.perf_counter(), None
    with pipe.stream(encode(DEFAULT_PROMPT), seed=0, frames=None) as stream:
        for chunk in stream:
            frames += len(chunk.frames)
            first = first if first is not None else (time.perf_counter() - t0) * 1e3
            if chunk.index + 1 == chunks:
                break
    return {"fps": frames / (time.perf_counter() - t0), "first_chunk_ms": first, "frames": frames}


def page_figures(url: str, seconds: float) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = context.new_page()
            page.goto(url)
            page.wait_for_function("window.demoStats.state === 'ready'")
            page.click("#start")
            page.wait_for_function("window.demoStats.painted > 0", timeout=30_000)
            page.wait_for_timeout(seconds * 1000)
            figures = page.evaluate("window.demoStats")
            page.click("#stop")
            page.wait_for_function("window.demoStats.state === 'stopped'", timeout=30_000)
            return figures
        finally:
            context.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--device")
    ap.add_argument("--seconds", type=float, default=8.0, help="streaming time before the figures are read")
    ap.add_argument("--no-realtime", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    pipe = ropesp.Pipeline(
        height=args.height, width=args.width, device=args.device, local_attn_frames=9, sink_frames=3
    )
    try:
        warm_up(pipe, None)
        alone_before = pipeline_fps(pipe, 8)
        with DemoServer(pipe, DemoConfig(port=0, realtime=not args.no_realtime)) as server:
            figures = page_figures(server.url, args.seconds)
        alone_after = pipeline_fps(pipe, 8)
    finally:
        pipe.close()
    alone = (alone_before["fps"] + alone_after["fps"]) / 2
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "size": list(pipe.size),
        "realtime": not args.no_realtime,
        "time_to_first_frame_ms": figures["ttffMs"],
        "on_screen_fps_last_4s": figures["onScreenFps"],
        "on_screen_fps_mean": figures["meanOnScreenFps"],
        "generation_fps_in_demo": figures["genFps"],
        "pipeline_fps_alone": alone,
        "pipeline_alone_runs": [alone_before, alone_after],
        "expected_on_screen_fps": min(16.0, alone),
        "painted": figures["painted"],
        "dropped": figures["dropped"],
    }
    print(json.dumps(out, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
