"""Where a fresh engines process's start goes, phase by phase, with the first chunk under the profiler.

    python scripts/cold_timeline.py --engines .eng/480_p1 --json timeline.json [--trace t.json.gz]

The steps of `ropesp generate --engines DIR` (the default prompt, the preview decoder off), each timed
from this script's first line with the device synchronized at its end: `import torch`; CUDA's start
(torch.cuda.init and a first allocation: the driver and the primary context); the runtime's imports; the
session build (under cProfile: its main-thread calls); the stream's first chunk under torch.profiler
(CPU ops of every thread, the CUDA runtime and driver calls, kernels); the remaining chunks; a second
video's first chunk (what is left once everything has been used once). The session build's parts
(KV cache, package digests, packages, the shape-only model, the weights' read, the prompt's K/V) are
timed by wrapping them in place.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pstats  # noqa: E402
from collections import defaultdict  # noqa: E402

TO_FIRST_CHUNK = (
    "before_import_torch_ms",
    "import_torch_ms",
    "cuda_start_ms",
    "runtime_imports_ms",
    "session_build_ms",
    "first_chunk_ms",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", help="engine directory (default: --backend eager on --preset)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    ap.add_argument("--json", required=True)
    ap.add_argument("--trace", help="chrome trace of the first chunk (.json or .json.gz)")
    args = ap.parse_args()
    phases: dict[str, float] = {}
    mark = [T0]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round((now - mark[0]) * 1e3, 1)
        mark[0] = now

    phase("before_import_torch_ms")
    import torch

    phase("import_torch_ms")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    phase("cuda_start_ms")
    from torch.profiler import ProfilerActivity, profile

    from ropesp.runtime.dist import Mapping
    from ropesp.runtime.pipeline import build_session
    from ropesp.runtime.prompts import default_prompt_embeds
    from ropesp.settings import RunConfig

    phase("runtime_imports_ms")
    build_parts = time_session_build_parts()
    cfg = RunConfig.of(
        preset=None if args.engines else args.preset,
        engines=args.engines,
        latent_frames=args.latent_frames,
        device=args.device,
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    prof_build = cProfile.Profile()
    prof_build.enable()
    session = build_session(cfg, Mapping())
    prompt = default_prompt_embeds(session.executor.cfg)
    session.reset(prompt, seed=0)
    sync()
    prof_build.disable()
    phase("session_build_ms")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    stream = iter(session)
    with profile(activities=activities) as prof:
        phase("profiler_start_ms")  # not a phase of generate: left out of to_first_chunk_ms
        first = next(stream)
        sync()
        phase("first_chunk_ms")
    rest = [c.elapsed_ms for c in stream]
    sync()
    phase("remaining_chunks_ms")
    session.reset(prompt, seed=1)
    stream = iter(session)
    next(stream)
    sync()
    phase("second_video_first_chunk_ms")
    for _ in stream:
        pass
    out = {
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "phases_ms": phases,
        "to_first_chunk_ms": round(sum(v for k, v in phases.items() if k in TO_FIRST_CHUNK), 1),
        "first_chunk_in_stream_ms": first.elapsed_ms,
        "later_chunks_ms": rest,
        "session_build_parts_ms": {k: round(v, 1) for k, v in build_parts.items()},
        "session_build_top": top_calls(prof_build, 25),
        "first_chunk": summarize_profile(prof),
    }
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    keys = ("phases_ms", "to_first_chunk_ms", "session_build_parts_ms")
    print(json.dumps({k: out[k] for k in keys}, indent=1))
    fc = out["first_chunk"]
    print(f"first chunk: {fc['kernel_ms']:.1f} ms of kernels in {phases['first_chunk_ms']:.1f} ms")
    for row in fc["cpu_ops"][:20]:
        print(f"  {row['self_cpu_ms']:8.1f} ms self  {row['count']:6d}x  {row['name'][:90]}")


def time_session_build_parts() -> dict[str, float]:
    """Wall time (ms, summed over calls) of the session build's parts, by wrapping them in place; the
    parts nest (the weights' read is inside load_weights, the model's construction too)."""
    from ropesp.model import wan
    from ropesp.runtime import engine, executor, pipeline
    from ropesp.runtime.session import StreamSession

    parts: dict[str, float] = defaultdict(float)

    def wrap(owner, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[key] += (time.perf_counter() - t) * 1e3

        setattr(owner, name, timed)

    wrap(pipeline, "make_state", "make_state (KV cache, RoPE tables)")
    wrap(engine, "load_engine_executor", "load_engine_executor")
    wrap(engine.Manifest, "validate", "  manifest validate (package digests)")
    wrap(engine.AotiSegment, "__init__", "  AOTI packages load")
    wrap(engine, "load_weights", "  load_weights")
    wrap(wan.CausalWanDiT, "__init__", "    CausalWanDiT on meta")
    wrap(engine, "read_safetensors", "    read_safetensors")
    wrap(engine.EngineExecutor, "__init__", "  EngineExecutor init")
    wrap(executor, "warm_device_libraries", "warm_device_libraries (thread)")
    wrap(StreamSession, "reset", "session reset (prompt cross K/V)")
    return parts


def top_calls(prof: cProfile.Profile, n: int) -> list[str]:
    """The n calls with the most cumulative time, as pstats prints them."""
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(n)
    return [line for line in text.getvalue().splitlines() if line.strip()][-n:]


def summarize_profile(prof) -> dict:
    """CPU-side events (ops, CUDA runtime and driver calls) by self time; kernels' total time."""
    import torch

    cpu: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    kernel_us = 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us += ev.device_time if hasattr(ev, "device_time") else ev.cuda_time
            continue
        row = cpu[ev.name]
        row[0] += ev.self_cpu_time_total
        row[1] += 1
    rows = sorted(cpu.items(), key=lambda kv: -kv[1][0])[:40]
    return {
        "kernel_ms": kernel_us / 1e3,
        "cpu_ops": [{"name": k, "self_cpu_ms": round(v[0] / 1e3, 2), "count": v[1]} for k, v in rows],
    }


if __name__ == "__main__":
    main()
