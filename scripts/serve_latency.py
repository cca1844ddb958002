"""First-chunk latency through Triton vs in-process, same pipeline, same machine, one run.

    python scripts/serve_latency.py --preset wan2.1-1.3b --latent-height 60 --latent-width 104 --latent-frames 21 \\
        --world-size 2 --device cuda --requests 3 --json out.json

In-process: ropesp.runtime.group.SessionGroup (rank 0 + P-1 worker ranks, exactly what the Triton model
instance runs). Through Triton: `ropesp serve-repo` + tritonserver on 127.0.0.1 + a gRPC streaming
client; the first chunk's arrival is taken on the client. Medians over --requests after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_client.py beside this file

import triton_client

from ropesp.runtime.group import SessionGroup
from ropesp.runtime.pipeline import PipelineConfig
from ropesp.runtime.prompts import default_prompt_embeds
from ropesp.serving.repository import write_repository
from ropesp.serving.server import TritonServer


def log(msg: str) -> None:
    """Progress on stderr (a run cut by a time limit still shows how far it got)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def in_process(config: PipelineConfig, prompt, frames: int, requests: int) -> tuple[list[float], list[float]]:
    first, total = [], []
    log("in-process: starting the ranks")
    with SessionGroup(config) as group:
        for i in range(requests + 1):
            log(f"in-process: request {i}")
            req = group.check(prompt, seed=i, latent_frames=frames)
            t0 = time.perf_counter()
            times = [(time.perf_counter() - t0) * 1e3 for _ in group.stream(req)]
            if i:  # the first request warms up
                first.append(times[0])
                total.append(times[-1])
    return first, total


def through_triton(
    config: PipelineConfig, prompt, frames: int, requests: int, server_log: str | None = None
) -> tuple[list[float], list[float]]:
    first, total = [], []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(repo, config)
        log("triton: starting tritonserver (the model loads and starts its ranks)")
        with TritonServer(repo, log_path=server_log) as server:
            for i in range(requests + 1):
                log(f"triton: request {i}")
                inputs = triton_client.make_inputs(prompt[0].numpy(), i, frames)
                arrivals = [c.arrival_ms for c in triton_client.stream(server.grpc_url, inputs)]
                if i:
                    first.append(arrivals[0])
                    total.append(arrivals[-1])
    return first, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--latent-height", type=int)
    ap.add_argument("--latent-width", type=int)
    ap.add_argument("--latent-frames", type=int, default=9)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--backend", default=None, help="eager (default) or compile")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--server-log", help="keep tritonserver's log here")
    args = ap.parse_args(argv)
    config = PipelineConfig(
        preset=args.preset,
        latent_height=args.latent_height,
        latent_width=args.latent_width,
        latent_frames=args.latent_frames,
        world_size=args.world_size,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
    )
    res = config.resolve()
    prompt = default_prompt_embeds(res.model)
    local = in_process(config, prompt, args.latent_frames, args.requests)
    served = through_triton(config, prompt, args.latent_frames, args.requests, args.server_log)
    out = {
        "preset": args.preset,
        "world_size": res.world_size,
        "device": res.device,
        "backend": res.backend,
        "latent": [res.geometry.latent_height, res.geometry.latent_width, args.latent_frames],
        "requests": args.requests,
        "in_process_first_chunk_ms": statistics.median(local[0]),
        "triton_first_chunk_ms": statistics.median(served[0]),
        "in_process_total_ms": statistics.median(local[1]),
        "triton_total_ms": statistics.median(served[1]),
    }
    out["triton_overhead_first_chunk_ms"] = out["triton_first_chunk_ms"] - out["in_process_first_chunk_ms"]
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
