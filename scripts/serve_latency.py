"""First-chunk latency through Triton vs in-process, same pipeline, same machine, one run.

    python scripts/serve_latency.py --preset wan2.1-1.3b --latent-height 60 --latent-width 104 --latent-frames 21 \\
        --world-size 2 --device cuda --requests 3 --json out.json

In-process: ropesp.runtime.engine_core.EngineCore (rank 0 + P-1 spawned ranks) with the preview decoder,
exactly what the Triton model instance of a default repository runs. Through Triton: `ropesp serve-repo` + tritonserver on 127.0.0.1 + a gRPC streaming
client; the first chunk's arrival is taken on the client. Medians over --requests after one warm-up.

Where the first chunk's time goes: in-process, `setup` is the request's start (session reset: prompt
K/V, cache reset, first noise) and `dit` the chunk's own forwards (Chunk.elapsed_ms, what `ropesp bench`
times); through Triton, `server` is the model's timing_ms (from the request's arrival in execute()) and
the rest of the client's arrival time is transport; "viewer" requests only the frames (the latents stay
on the server), as triton_client.py does. --trace DIR profiles one more in-process request.
Cold start: the model's load (tritonserver start to ready, the ranks and engines loaded inside) and the
first request's first chunk are reported separately from the warm medians. `--engines DIR` serves built
engines; `--skip-in-process` measures Triton alone.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_client.py beside this file

import torch
import triton_client

from ropesp.decode import PreviewDecoder
from ropesp.runtime.dist import Mapping, device_for
from ropesp.runtime.engine_core import EngineCore
from ropesp.runtime.pipeline import resolve
from ropesp.runtime.prompts import default_prompt_embeds
from ropesp.serving.repository import write_repository
from ropesp.serving.server import TritonServer
from ropesp.settings import RunConfig


def log(msg: str) -> None:
    """Progress on stderr (a run cut by a time limit still shows how far it got)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def in_process(
    config: RunConfig, res, prompt, frames: int, requests: int, trace: str | None = None
) -> dict[str, list[float]]:
    """Per timed request: first chunk (ms from the call), its DiT part, and the whole video (ms).
    res: config resolved."""
    out: dict[str, list[float]] = {"first": [], "dit": [], "total": []}
    log("in-process: starting the ranks")
    decoder = PreviewDecoder(device=device_for(Mapping(res.world_size), res.device))  # as the served model's
    with EngineCore(res, decoder=decoder).start() as core:
        for i in range(requests + 1):
            log(f"in-process: request {i}")
            req = core.request(prompt, seed=i, latent_frames=frames)
            t0 = time.perf_counter()
            chunks = [(chunk.elapsed_ms, (time.perf_counter() - t0) * 1e3) for chunk in core.open(req)]
            if i:  # the first request warms up
                out["first"].append(chunks[0][1])
                out["dit"].append(chunks[0][0])
                out["total"].append(chunks[-1][1])
        if trace:
            _profile_request(core, core.request(prompt, seed=requests + 1, latent_frames=frames), trace)
    return out


def _profile_request(core: EngineCore, req, trace_dir: str) -> None:
    """One in-process request under torch.profiler: a Chrome trace and the top host ops, in trace_dir."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    out = Path(trace_dir)
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities) as prof:
        with record_function("ropesp.request"):
            stream = core.open(req)
            next(stream)  # the first chunk is what a client waits for
            stream.cancel()
    prof.export_chrome_trace(str(out / "in_process_request.json.gz"))  # gzip: tens of MB at full size
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
    (out / "in_process_request.txt").write_text(table)
    log(f"in-process: trace of one request in {out}")


READY = re.compile(r"ropesp: ready in ([0-9.]+) s[^(]*\(([^)]*)\)")
IMPORTS = re.compile(r"ropesp: imports: ([^(]*)\(([^)]*)\)")
PHASE = re.compile(r"([a-z][a-z ]*?) ([0-9.]+) s")


def initialize_phases(server_log: str) -> dict[str, float]:
    """The model's own account of its load (ropesp/serving/triton_model.py logs it when initialize ends): seconds from
    the model module's start to ready ("total"), per phase, per import ("import_steps") and where the
    stub's bytecode cache is ("bytecode"); {} if the lines are not in the log."""
    found = READY.search(server_log)
    if found is None:
        return {}
    phases = {"total": float(found[1])}
    for name, seconds in PHASE.findall(found[2]):
        phases[name] = float(seconds)
    imports = IMPORTS.search(server_log)
    if imports is not None:
        phases["import_steps"] = {name: float(seconds) for name, seconds in PHASE.findall(imports[1])}
        phases["bytecode"] = imports[2]
    return phases


def through_triton(
    config: RunConfig, prompt, frames: int, requests: int, server_log: str | None = None
) -> dict[str, dict[str, list[float]]]:
    """Per outputs variant ("all"; "viewer": frames only, as triton_client.py's MP4 asks) and timed
    request: the first chunk's client arrival, its server timing_ms, the last arrival (ms)."""
    variants = {"all": None, "viewer": triton_client.VIEWER_OUTPUTS}
    out = {name: {"first": [], "server": [], "total": []} for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(repo, config)
        log("triton: starting tritonserver (the model loads and starts its ranks)")
        t_load = time.perf_counter()
        with TritonServer(repo, log_path=server_log) as server:
            out["cold"] = {"load_to_ready_s": [time.perf_counter() - t_load]}
            if server_log:
                out["cold"]["model_initialize"] = initialize_phases(Path(server_log).read_text())
            for name, outputs in variants.items():
                for i in range(requests + 1):
                    log(f"triton ({name} outputs): request {i}")
                    inputs = triton_client.make_inputs(prompt[0].numpy(), i, frames)
                    chunks = list(triton_client.stream(server.grpc_url, inputs, outputs=outputs))
                    if i:  # the first request of each variant warms up
                        out[name]["first"].append(chunks[0].arrival_ms)
                        out[name]["server"].append(chunks[0].server_ms)
                        out[name]["total"].append(chunks[-1].arrival_ms)
                    elif name == "all":
                        out["cold"]["first_request_first_chunk_ms"] = [chunks[0].arrival_ms]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--latent-height", type=int)
    ap.add_argument("--latent-width", type=int)
    ap.add_argument("--latent-frames", type=int, default=9)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--backend", default=None, help="eager (default) or compile; engines: from --engines")
    ap.add_argument("--engines", help="engine directory of `ropesp build` (the preset is not used then)")
    ap.add_argument("--skip-in-process", action="store_true", help="measure through Triton only")
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--server-log", help="keep tritonserver's log here")
    ap.add_argument("--trace", help="profile one more in-process request into this directory")
    args = ap.parse_args(argv)
    config = RunConfig.of(
        preset=None if args.engines else args.preset,
        engines=args.engines,
        latent_height=args.latent_height,
        latent_width=args.latent_width,
        latent_frames=args.latent_frames,
        world_size=args.world_size,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
    )
    res = resolve(config)
    prompt = default_prompt_embeds(res.model)
    empty = {"first": [0.0], "dit": [0.0], "total": [0.0]}
    local = (
        empty
        if args.skip_in_process
        else in_process(config, res, prompt, args.latent_frames, args.requests, args.trace)
    )
    served = through_triton(config, prompt, args.latent_frames, args.requests, args.server_log)
    med = statistics.median
    out = {
        "triton_load_to_ready_s": served["cold"]["load_to_ready_s"][0],
        "triton_cold_first_chunk_ms": served["cold"]["first_request_first_chunk_ms"][0],
        "triton_model_initialize_s": served["cold"].get("model_initialize", {}),
        "model": args.engines or args.preset,  # the engines' directory, or the preset
        "world_size": res.world_size,
        "device": res.device,
        "backend": res.backend,
        "latent": [res.geometry.latent_height, res.geometry.latent_width, args.latent_frames],
        "requests": args.requests,
        "in_process_first_chunk_ms": med(local["first"]),
        "in_process_first_chunk_dit_ms": med(local["dit"]),
        "in_process_first_chunk_setup_ms": med(f - d for f, d in zip(local["first"], local["dit"])),
        "triton_first_chunk_ms": med(served["all"]["first"]),
        "triton_first_chunk_server_ms": med(served["all"]["server"]),
        "triton_viewer_first_chunk_ms": med(served["viewer"]["first"]),
        "triton_viewer_first_chunk_server_ms": med(served["viewer"]["server"]),
        "in_process_total_ms": med(local["total"]),
        "triton_total_ms": med(served["all"]["total"]),
        "triton_viewer_total_ms": med(served["viewer"]["total"]),
    }
    out["triton_overhead_first_chunk_ms"] = out["triton_first_chunk_ms"] - out["in_process_first_chunk_ms"]
    out["per_request"] = {"in_process": local, **{f"triton_{k}": v for k, v in served.items()}}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
