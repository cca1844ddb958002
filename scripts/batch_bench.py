"""Batched streams on one DiT: is one forward over B streams' chunks faster than B forwards, one stream each?

    python scripts/batch_bench.py --preset wan2.1-1.3b --height 480 --width 832 --backend compile \\
        --batches 1,2,3,4 --chunks 6 --json batch.json [--precision fp8 --attention fp8] [--all-streams]

One model is loaded once. For each B in --batches (B = 1, the baseline, always runs first) the causal Wan
DiT gets a KV cache of batch B (runtime/runners.py SPState(batch=B), one slot) and the eager executor
(runtime/executor.py; with --backend compile the regions are compiled once, on the shared model, and each
B is one more specialization). B streams then run in lock-step: stream i has its own seeded prompt
embedding and its own noise generator (seed i, drawn in runtime/session.py's order), so stream i's inputs
are the same at every B. A chunk is what runtime/session.py does per chunk: one forward per denoising step
of the sampler's schedule (runtime/sampler.py FlowSchedule, x0 and re-noising in between), then the
clean-context forward (t = --context-noise) that writes the chunk into the cache; here every chunk, the
last too, takes that pass. A first stream of --chunks chunks warms up (compilation, CUDA graph capture,
allocator), then --repeats timed streams run.

Figures per B, in milliseconds of one chunk of all B streams (its forwards and the updates
between them): CUDA events on a GPU (scripts/cuda_timing.py median_ms of the one call, after a device
sync), time.perf_counter on the CPU; each chunk's median over the timed streams:
  first_chunk_ms    chunk 0 of a timed stream: what a new viewer waits for its first frames when its first
                    chunk rides in a batch of B (the prompt's K/V, prompt_ms, come before it)
  steady_ms         median over the steady chunks: those that roll the rolling window (each attends to a
                    full window and shifts it first); if none does, those whose window is full; with global
                    attention (--local-attn-frames -1), the last chunk
  per_stream_ms     steady_ms / B
  vs_sequential     B * steady_ms(B=1) / steady_ms(B): throughput of one batched chunk against B chunks of
                    one stream run one after the other (> 1: batching wins)
The rolling window defaults to the served engines' 9 latent frames with a 3-frame sink
(ropesp/settings.py SERVED_DEFAULTS). On a CPU shared with other work, run with OMP_NUM_THREADS=1: on a
busy 2-core host two OpenMP threads waited on each other's time slices (a tiny model's chunk took 1.9 s
instead of 28 ms).

Exactness: for every B > 1, max |difference| and relative L2 of stream 0's latents (every chunk's final x0;
with --all-streams every stream's, its B = 1 reference run untimed) against the same stream at B = 1, and
rerun_max_abs, the same for two runs at one B (the run-to-run floor, 0 where kernels are deterministic).
Bit-identical latents are not expected batched: with B the GEMMs' M grows (B x tokens rows), so the
BLAS may pick other tilings and reduction orders, and attention other splits; each stream's own numbers
are otherwise computed alone (no op mixes streams). Expected: float32 on the CPU, differences at float32
rounding (tests/test_batch_bench_script.py bounds them); bf16 on a GPU, differences of bf16 rounding that
grow over the stream, since each chunk's enter the cache the next one reads. Measured on an H100 (Wan-1.3B
480p, 6 chunks; bench/RESULTS.md, seventeenth session): bf16 rel L2 0.0076 (max|d| 0.046) at B = 2 and 3;
FP8 attention bit-identical at B = 2 and 0.028 at B = 3 and 4 (e4m3 roundings that flip), under FP8's own
0.055 from bf16.

The streams of a batch share every chunk's start frame and cache slot plan (one RoPE position and one
window for the batch): this measures streams in lock-step, not streams at different positions.
--attention fp8 keeps per-stream numerics batched: the e4m3 cache's offsets and scales and q's scales are
per (batch, head) (plugins/e4m3_cache.py, plugins/e4m3.py) and FlashAttention-3 takes descales [B, H];
its quantizers are compiled per shape (dynamic=False), so each B compiles its own.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cuda_timing.py beside this file

PROMPT_SEED = 1000
"""Stream i's prompt embedding is drawn from seed PROMPT_SEED + i (its noise from seed i)."""
PROMPT_TOKENS = 32
"""Tokens of each random prompt embedding (runtime/prompts.py's default embedding has as many)."""
BENCH_DEFAULTS = {"local_attn_frames": 9, "sink_frames": 3}
"""The served engines' rolling window (ropesp/settings.py SERVED_DEFAULTS): streams that run on."""


class BenchError(Exception):
    """Bad input to this script: one line naming the flag."""


def parse_batches(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4]: sorted, unique, 1 (the baseline) added."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise BenchError(f"--batches {text}: give comma-separated batch sizes >= 1, e.g. 1,2,3,4")
    return sorted({1, *sizes})


def steady_chunks(sizes: list[int], cache) -> list[int]:
    """Indices of the steady chunks (module docstring) of a stream of chunks of `sizes` latent frames."""
    if cache.rolling:
        ends = list(itertools.accumulate(sizes))
        rolls = [i for i, end in enumerate(ends) if end > cache.local_attn_frames]
        full = [i for i, end in enumerate(ends) if end >= cache.local_attn_frames]
        if rolls or full:
            return rolls or full
    return [len(sizes) - 1]


def stream_prompts(cfg, streams: range):
    """[len(streams), PROMPT_TOKENS, text_dim] float32: stream i's seeded embedding at row i."""
    import torch

    rows = []
    for i in streams:
        g = torch.Generator("cpu").manual_seed(PROMPT_SEED + i)
        rows.append(torch.randn(1, min(PROMPT_TOKENS, cfg.text_len), cfg.text_dim, generator=g) * 0.1)
    return torch.cat(rows)


def clock(device):
    """timed(fn) -> milliseconds of fn(): CUDA events after a device sync on a GPU, perf_counter else."""
    if device.type == "cuda":
        from cuda_timing import median_ms

        return lambda fn: median_ms(fn, reps=1, warmup=0)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return timed


def run_stream(executor, schedule, sizes: list[int], streams: range, geometry, timed):
    """One stream of len(sizes) chunks for `streams` in lock-step (stream i: prompt PROMPT_SEED + i, noise
    seed i). Returns (prompt ms, ms per chunk, latents [B, F, C, h, w] float32 on the CPU: every chunk's x0)."""
    import torch

    from ropesp.runtime.sampler import NoiseStream

    device = executor.device
    noises = [NoiseStream(i) for i in streams]

    def draw(frames: int) -> torch.Tensor:
        shape = (1, frames, executor.cfg.in_dim, geometry.latent_height, geometry.latent_width)
        return torch.cat([n.draw(shape, device) for n in noises])  # [B, F, C, h, w]

    steps, sigmas = schedule.timesteps, schedule.step_sigmas
    context_t = torch.tensor(schedule.context_t)
    prompts = stream_prompts(executor.cfg, streams)
    executor.reset()
    prompt_ms = timed(lambda: executor.set_prompt(prompts))
    latents: list[torch.Tensor] = []
    pending = {"x": draw(sizes[0]), "start": 0}

    def chunk(index: int) -> None:
        n, start = sizes[index], pending["start"]
        x = x0 = pending["x"]
        for i in range(len(steps)):
            flow = executor.forward(x, steps[i], start)
            if i == 0:  # the session's order: this chunk's re-noising draws, then the next chunk's noise
                eps = [draw(n) for _ in range(len(steps) - 1)]
                if index + 1 < len(sizes):
                    pending["x"] = draw(sizes[index + 1])
            x0 = schedule.to_x0(x, flow, sigmas[i])
            if i + 1 < len(steps):
                x = schedule.add_noise(x0, eps[i], sigmas[i + 1])
        executor.forward(x0, context_t, start)  # the clean-context pass: this chunk into the cache
        latents.append(x0)
        pending["start"] = start + n

    chunk_ms = [timed(lambda i=i: chunk(i)) for i in range(len(sizes))]
    return prompt_ms, chunk_ms, torch.cat(latents, dim=1).float().cpu()


def differences(x, ref) -> dict:
    from ropesp.bench import rel_l2

    return {"max_abs": float((x - ref).abs().max()), "rel_l2": rel_l2(x, ref)}


def bench(args, batches: list[int], config) -> dict:
    import torch

    from ropesp import limits
    from ropesp.errors import ConfigError, arg
    from ropesp.runtime.dist import device_for
    from ropesp.runtime.executor import EagerExecutor, compile_regions
    from ropesp.runtime.pipeline import make_state, resolve_rank, resolved_model
    from ropesp.runtime.sampler import FlowSchedule
    from ropesp.settings import MODEL_BACKENDS

    if config.compute.backend not in (None, *MODEL_BACKENDS):
        raise ConfigError(
            f"{arg('backend', config.compute.backend)}: batch_bench runs the PyTorch model "
            f"({' or '.join(MODEL_BACKENDS)}); engines are not measured here"
        )
    sampler = config.sampler
    sizes = [sampler.chunk_size(i) for i in range(args.chunks)]
    # the stream's length sizes the cache where there is no rolling window; one slot: the batch is the cache's B
    config = config.replace(latent_frames=sum(sizes), max_streams=1, decoder="none")
    res, mapping = resolve_rank(config)
    if mapping.world_size != 1:
        raise ConfigError(f"batch_bench runs one rank, not a group of {mapping.world_size} (WORLD_SIZE)")
    itemsize = res.cache_itemsize
    g = res.geometry
    try:
        limits.check_cache_fits(res.model, g.frame_tokens, res.cache, itemsize, 1, res.device, max(batches))
    except ConfigError as exc:
        raise ConfigError(f"--batches {max(batches)}: {exc}") from None
    device = device_for(mapping, res.device)
    cuda = device.type == "cuda"
    compiled = res.backend == "compile"
    graphs = compiled and config.compute.cuda_graphs
    if compiled or cuda:
        import torch._dynamo

        # every compiled function (the regions, the e4m3 quantizers) specializes once per B
        # (dynamic=False); past the limit Dynamo would run the later B's eagerly and skew their times
        cfg_dynamo = torch._dynamo.config
        cfg_dynamo.recompile_limit = max(cfg_dynamo.recompile_limit, 4 * len(batches) + 8)
    model = resolved_model(res, device)
    if compiled:
        compile_regions(model)  # once, in place: every B's executor runs the same compiled regions
    schedule = FlowSchedule(sampler)
    steady = steady_chunks(sizes, res.cache)
    timed = clock(device)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    out = {
        "device": name,
        "torch": torch.__version__,
        "config": res.config.to_dict(),
        "model": {"dim": res.model.dim, "layers": res.model.num_layers, "heads": res.model.num_heads},
        "latent_size": [g.latent_height, g.latent_width],
        "frame_tokens": g.frame_tokens,
        "window": [res.cache.local_attn_frames, res.cache.sink_frames],
        "timesteps": [float(t) for t in schedule.timesteps],
        "chunk_frames": sizes,
        "steady_chunks": steady,
        "batches": batches,
        "repeats": args.repeats,
        "all_streams": args.all_streams,
        "rows": [],
    }
    print(f"{name}, torch {torch.__version__}, {res.backend}, {res.dtype}, {g.latent_height}x"
          f"{g.latent_width} latents, chunks {sizes}, steady chunks {steady}", flush=True)  # fmt: skip
    references: dict[int, torch.Tensor] = {}
    t_start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            row = {"batch": b}
            executor = state = None
            try:
                state = make_state(res, mapping, device, slots=1, batch=b)
                executor = EagerExecutor(model, state, cuda_graphs=graphs)
                if compiled:
                    executor.rope = "op"  # as an executor that compiled the regions itself runs them
                streams = range(b)
                t0 = time.perf_counter()
                _, warm_ms, warm = run_stream(executor, schedule, sizes, streams, g, timed)
                row["warmup_stream_s"] = time.perf_counter() - t0
                row["warmup_first_chunk_ms"] = warm_ms[0]
                runs = [run_stream(executor, schedule, sizes, streams, g, timed) for _ in range(args.repeats)]
                chunk_ms = [statistics.median(ms) for ms in zip(*(r[1] for r in runs))]
                latents = runs[-1][2]
                row["prompt_ms"] = statistics.median(r[0] for r in runs)
                row["chunk_ms"] = chunk_ms
                row["first_chunk_ms"] = chunk_ms[0]
                row["steady_ms"] = statistics.median(chunk_ms[i] for i in steady)
                row["per_stream_ms"] = row["steady_ms"] / b
                row["rerun_max_abs"] = float((warm - latents).abs().max())
                if b == 1:
                    references[0] = latents[0]
                    others = range(1, max(batches)) if args.all_streams else range(0)
                    for i in others:  # each stream alone, untimed: the references of every batch row
                        alone = run_stream(executor, schedule, sizes, range(i, i + 1), g, timed)
                        references[i] = alone[2][0]
                else:
                    compared = range(b) if args.all_streams else range(1)
                    row["exactness"] = [
                        {"stream": i, **differences(latents[i], references[i])} for i in compared
                    ]
            except torch.OutOfMemoryError as exc:
                row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
            finally:
                del executor, state
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            out["rows"].append(row)
            if "error" not in row:
                row["vs_sequential"] = b * out["rows"][0]["steady_ms"] / row["steady_ms"]
            out["seconds"] = time.perf_counter() - t_start
            if args.json:  # after every B: a long run's finished rows survive its end
                Path(args.json).write_text(json.dumps(out, indent=1))
            if "error" in row:
                print(f"B={b}: {row['error']}; larger batches skipped", flush=True)
                break
    return out


def table(out: dict) -> str:
    lines = [
        f"{'B':>3} {'first ms':>10} {'steady ms':>10} {'ms/stream':>10} {'vs 1-by-1':>10} "
        f"{'max|d| s0':>10} {'relL2 s0':>10}"
    ]
    for row in out["rows"]:
        if "error" in row:
            lines.append(f"{row['batch']:>3} {row['error']}")
            continue
        ex = (row.get("exactness") or [{}])[0]
        d = f"{ex['max_abs']:10.2e} {ex['rel_l2']:10.2e}" if ex else f"{'-':>10} {'-':>10}"
        lines.append(
            f"{row['batch']:>3} {row['first_chunk_ms']:10.2f} {row['steady_ms']:10.2f} "
            f"{row['per_stream_ms']:10.2f} {row['vs_sequential']:9.2f}x {d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ropesp.cli.flags import add_flags, config_from_args
    from ropesp.errors import RopespError
    from ropesp.settings import SECTIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # the run settings a chunk depends on; the stream's length is --chunks; no engines (the model only)
    add_flags(p, SECTIONS["source"], exclude=("engines",))
    add_flags(
        p, SECTIONS["video"], exclude=("frames", "latent_frames", "max_frames"), defaults=BENCH_DEFAULTS
    )
    add_flags(p, SECTIONS["sampler"])
    add_flags(p, SECTIONS["compute"])
    g = p.add_argument_group("batch")
    g.add_argument("--batches", default="1,2,3,4", help="comma-separated batch sizes B (1 always runs)")
    g.add_argument("--chunks", type=int, default=6, help="chunks of each stream (default: 6)")
    g.add_argument("--repeats", type=int, default=1, help="timed streams per B after the warm-up one")
    g.add_argument(
        "--all-streams",
        action="store_true",
        help="compare every stream of a batch with its own B = 1 run (default: stream 0)",
    )
    g.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    try:
        batches = parse_batches(args.batches)
        for flag, value in (("--chunks", args.chunks), ("--repeats", args.repeats)):
            if value < 1:
                raise BenchError(f"{flag} {value} must be >= 1")
        out = bench(args, batches, config_from_args(args))
    except BenchError as exc:
        print(f"batch_bench: error: {exc}", file=sys.stderr)
        return 2
    except RopespError as exc:
        print(f"batch_bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
