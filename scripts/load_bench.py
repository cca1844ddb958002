"""Many viewers on one engine, through the real front ends: N clients at once, each measuring the frames it
is delivered and when its first frame came.

    python scripts/load_bench.py --front demo --clients 1,2,3,4 --chunks 20 --json load.json \\
        --preset wan2.1-1.3b --height 480 --width 832 --backend compile --precision fp8 --attention fp8

For each N in --clients, N clients start a stream at once (seeds 0..N-1), take --chunks chunks and stop:
    demo    the web demo's WebSocket (ropesp/webdemo: the page's own protocol), served in this process with
            the page's real-time pacing off, so a stream runs as fast as the engine gives it chunks;
    triton  Triton's gRPC (a repository written here, `tritonserver` started here), bounded streams, each
            a Triton sequence; --instances N serves N engines as model instances (each stream pinned to one).
Per client: delivered FPS (frames after the first over the time from the first frame to the last) and time
to first frame (request sent to first frame received). Per N: per-stream FPS min / median, first frame
p50 / p95, their sum against one stream alone (N = 1, the same run) and the refusals (at capacity). The run
settings are `ropesp demo`'s flags (the engine's window 9/3 unless given); the engine's admission is off
unless --realtime-fps is given, so the streams share the device fairly. Each round starts on an idle engine,
IDLE_S after the one before. The demo's first chunk comes as its first frame and then the rest
(`early_first_frame`, on for served engines; --no-early-first-frame hands it over whole).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_client.py beside this file

IDLE_S = 1.0
"""Seconds between rounds (and after the warm-up): longer than any chunk the engine may still be on."""

PROMPTS = (
    "a red square moving right",
    "two blue discs bouncing",
    "three white squares entering from the top",
)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def summarize(clients: list[dict]) -> dict:
    """One N's figures from its clients' records."""
    served = [c for c in clients if not c.get("refused")]
    fps = [c["fps"] for c in served]
    ttff = [c["ttff_ms"] for c in served]
    return {
        "clients": len(clients),
        "refused": len(clients) - len(served),
        "refusals": [c["refused"] for c in clients if c.get("refused")],
        "fps_min": min(fps) if fps else None,
        "fps_median": statistics.median(fps) if fps else None,
        "fps_sum": sum(fps),
        "first_frame_p50_ms": percentile(ttff, 0.5) if ttff else None,
        "first_frame_p95_ms": percentile(ttff, 0.95) if ttff else None,
        "per_client": clients,
    }


def delivered(times: list[float], start: float) -> dict:
    """A client's figures from its frames' arrival times (perf_counter seconds) and its start."""
    span = times[-1] - times[0]
    return {
        "frames": len(times),
        "fps": (len(times) - 1) / span if span > 0 else 0.0,
        "ttff_ms": (times[0] - start) * 1e3,
    }


# --- the demo's WebSocket ------------------------------------------------------------------------------
async def _demo_client(url: str, seed: int, chunks: int, prompt: str, delay_s: float = 0.0) -> dict:
    import aiohttp

    from ropesp.webdemo.frames import parse_frame_message

    await asyncio.sleep(delay_s)
    async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws", max_msg_size=0) as ws:
        await ws.receive_json()  # hello
        start = time.perf_counter()
        await ws.send_json({"type": "start", "prompt": prompt, "seed": seed})
        times, engine = [], None
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                if parse_frame_message(msg.data)[1] < chunks:  # frames of a later chunk are not counted
                    times.append(time.perf_counter())
                continue
            m = msg.json()
            if m["type"] == "busy":
                return {"seed": seed, "refused": m["message"]}
            if m["type"] == "error":
                raise RuntimeError(m["message"])
            if m["type"] == "chunk":
                if (
                    engine is None
                ):  # the engine's account of the first frames: from its open to their being ready
                    engine = m["timings"]
                if m["index"] >= chunks:  # a chunk after the counted ones: those are all in
                    await ws.send_json({"type": "stop"})
                    break
        return {
            "seed": seed,
            **delivered(times, start),
            "first_chunk_engine_ms": engine.get("elapsed") if engine else None,
            "first_chunk_dit_ms": engine.get("dit") if engine else None,
            "first_chunk_decode_ms": engine.get("decode") if engine else None,
        }


def traced(path: str | None):
    """A torch profiler over one round (CPU ops of every thread, and CUDA kernels on a GPU) that writes its
    Chrome trace, gzipped, to path; nothing without a path."""
    if not path:
        return contextlib.nullcontext()
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    # every thread (the engine's, the decoder's, the streams' workers), and Python's GC pauses, where this
    # torch's profiler has the options
    wanted = {"profile_all_threads": True, "record_python_gc_info": True}
    while True:
        try:
            experimental = torch._C._profiler._ExperimentalConfig(**wanted)
            break
        except TypeError:
            if not wanted:
                raise
            wanted.popitem()

    @contextlib.contextmanager
    def run():
        with torch.profiler.profile(activities=activities, experimental_config=experimental) as prof:
            yield
        raw = Path(path).with_suffix("")  # export_chrome_trace writes plain JSON
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()

    return run()


def run_demo(
    config, counts: list[int], chunks: int, stagger_s: float = 0.0, trace: str | None = None
) -> dict:
    import ropesp
    from ropesp.webdemo.server import DemoConfig, DemoServer, warm_up

    pipe = ropesp.Pipeline.from_config(config)
    try:
        warm_up(pipe, None)  # on a GPU every slot's CUDA graphs captured
        out = {}
        with DemoServer(pipe, DemoConfig(port=0, realtime=False)) as server:
            for n in counts:
                # every round starts on an idle engine: a stream cancelled at the end of the warm-up or of
                # the round before still finishes the chunk it is on, and a round's first viewers would
                # wait for it (seen in a profile, bench/RESULTS.md eighteenth session)
                time.sleep(IDLE_S)

                async def clients(n=n):
                    jobs = [
                        _demo_client(server.url, s, chunks, PROMPTS[s % len(PROMPTS)], s * stagger_s)
                        for s in range(n)
                    ]
                    return await asyncio.gather(*jobs)

                with traced(trace if n == counts[0] else None):
                    out[n] = summarize(list(asyncio.run(clients())))
                print(f"demo, {n} client(s): {_line(out[n])}", file=sys.stderr, flush=True)
        return out
    finally:
        pipe.close()


# --- Triton's gRPC --------------------------------------------------------------------------------------
def run_triton(config, counts: list[int], chunks: int, workdir: Path, instances: int = 1) -> dict:
    """Each client one gRPC stream, run as a Triton sequence (its own ID): with several `instances`
    Triton's sequence batcher gives each stream an instance, whose engine admits it or not."""
    import numpy as np
    import triton_client

    from ropesp.runtime.pipeline import resolve
    from ropesp.runtime.prompts import default_prompt_embeds
    from ropesp.serving.repository import write_repository
    from ropesp.serving.server import TritonServer

    res = resolve(config)
    write_repository(workdir / "repo", config, instances=instances, overwrite=True)
    prompt = default_prompt_embeds(res.model)[0].numpy().astype(np.float32)
    frames = 3 * chunks
    out = {}
    with TritonServer(workdir / "repo", log_path=workdir / "triton.log") as server:
        # warm: one stream per instance at once (the sequence batcher spreads concurrent sequences)
        warm = [
            threading.Thread(
                target=lambda i: list(
                    triton_client.stream(
                        server.grpc_url, triton_client.make_inputs(prompt, 0, 3), sequence_id=f"warm-{i}"
                    )
                ),
                args=(i,),
            )
            for i in range(instances)
        ]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        for n in counts:
            time.sleep(IDLE_S)  # on an idle engine, as run_demo
            records: list[dict] = [{} for _ in range(n)]

            def one(seed: int, records=records) -> None:
                start = time.perf_counter()
                times = []
                try:
                    inputs = triton_client.make_inputs(prompt, seed, frames)
                    for chunk in triton_client.stream(
                        server.grpc_url,
                        inputs,
                        outputs=triton_client.VIEWER_OUTPUTS,
                        sequence_id=uuid.uuid4().hex,
                    ):
                        times += [time.perf_counter()] * len(chunk.frames)
                except Exception as exc:
                    records[seed] = {"seed": seed, "refused": str(exc)}
                    return
                records[seed] = {"seed": seed, **delivered(times, start)}

            threads = [threading.Thread(target=one, args=(s,)) for s in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[n] = summarize(records)
            print(f"triton, {n} client(s): {_line(out[n])}", file=sys.stderr, flush=True)
    return out


def _line(row: dict) -> str:
    if row["fps_median"] is None:
        return f"all {row['refused']} refused"
    return (
        f"FPS per stream min {row['fps_min']:.1f} median {row['fps_median']:.1f}, sum {row['fps_sum']:.1f}; "
        f"first frame p50 {row['first_frame_p50_ms']:.0f} ms p95 {row['first_frame_p95_ms']:.0f} ms; "
        f"refused {row['refused']}"
    )


def main(argv: list[str] | None = None) -> int:
    from ropesp.cli.flags import add_flags, config_from_args
    from ropesp.errors import RopespError
    from ropesp.settings import SECTIONS, SERVED_DEFAULTS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for section in SECTIONS.values():
        add_flags(p, section, defaults={**SERVED_DEFAULTS, "realtime_fps": 0.0})
    g = p.add_argument_group("load")
    g.add_argument("--front", choices=("demo", "triton"), default="demo")
    g.add_argument("--clients", default="1,2,3", help="comma-separated client counts, one run each")
    g.add_argument("--chunks", type=int, default=10, help="chunks each client takes")
    g.add_argument(
        "--stagger",
        type=float,
        default=0.0,
        help="seconds between the clients' starts (demo): each joins the load the earlier ones make",
    )
    g.add_argument(
        "--instances",
        type=int,
        default=1,
        help="(triton) engines served as model instances, each --max-streams slots (serve-repo --instances)",
    )
    g.add_argument("--json", help="write the figures here")
    g.add_argument(
        "--trace",
        metavar="PATH",
        help="(demo) profile the first round (torch profiler: every thread's ops, CUDA kernels) into a "
        "gzipped Chrome trace at PATH (.json.gz)",
    )
    args = p.parse_args(argv)
    try:
        counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients {args.clients}: give comma-separated client counts, e.g. 1,2,3")
    if min(counts) < 1 or args.chunks < 1 or args.instances < 1:
        p.error("--clients, --chunks and --instances must be >= 1")
    if args.trace and args.front != "demo":
        p.error("--trace profiles the demo's engine in this process; Triton's runs in the server's")
    try:
        return _run(args, counts, config_from_args(args))
    except RopespError as exc:
        print(f"load_bench: error: {exc}", file=sys.stderr)
        return 2


def _run(args, counts: list[int], config) -> int:
    if config.streams.max_streams is None:
        config = config.replace(max_streams=max(counts))
    t0 = time.perf_counter()
    if args.front == "demo":
        rows = run_demo(config, counts, args.chunks, args.stagger, args.trace)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            rows = run_triton(config, counts, args.chunks, Path(tmp), args.instances)
    base = rows[counts[0]]["fps_sum"] if counts[0] == 1 else None
    for row in rows.values():
        row["sum_vs_one_stream"] = row["fps_sum"] / base if base else None
    out = {"front": args.front, "chunks": args.chunks, "stagger_s": args.stagger, "instances": args.instances}
    out["config"] = config.to_dict()
    out["results"] = rows
    out["seconds"] = round(time.perf_counter() - t0, 1)
    try:
        import torch

        out["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        out["torch"] = torch.__version__
    except ImportError:
        pass
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    for n, row in rows.items():
        ratio = f", sum {row['sum_vs_one_stream']:.2f}x one stream" if row["sum_vs_one_stream"] else ""
        print(f"{args.front} N={n}: {_line(row)}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
