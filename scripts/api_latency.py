"""First-chunk latency of ropesp.Pipeline against the raw StreamSession, same config, same run; and the
cost of a prompt change (swap / recache) at a chunk boundary.

    python scripts/api_latency.py --preset wan2.1-1.3b --height 480 --width 832 --frames 81 \\
        --device cuda --requests 5 --json out.json

Both sides get the same prompt embeddings, seed and preview decoder and are timed from the call that
starts a stream to its first chunk in the caller's hands: raw = `session.reset(prompt, seed)` then the
first `next()`; API = `pipe.stream(prompt, seed, frames)` then the first `next()` (its request checks,
the group's request bookkeeping and the StreamChunk conversion included). Requests alternate between the
two so they share the machine's state; medians after one warm-up each. The switch costs come from
StreamChunk.timings["switch"] (host clock around the new prompt's K/V and, for recache, the replayed
clean-context forwards of the cached chunks: it includes any wait for GPU work queued before it);
switch_added_to_chunk_gap_ms is what the caller sees: the gap between the chunk the switch came before and
the chunk ahead of it, less the same gap in the same streams without a switch (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import ropesp
from ropesp.runtime.pipeline import build_session, stream_decoder
from ropesp.runtime.prompts import default_prompt_embeds


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args) -> dict:
    pipe = ropesp.Pipeline(
        preset=args.preset,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        height=args.height,
        width=args.width,
        max_frames=(args.frames + 3) // 4,
    )
    try:
        res = pipe.resolved
        decoder = stream_decoder(res, torch.device(res.device))  # the Pipeline's own recipe
        session = build_session(pipe.config, decoder=decoder)
        prompt = default_prompt_embeds(res.model)
        other = prompt.flip(1)
        raw, api = [], []
        for i in range(args.requests + 1):
            _sync(res.device)
            t0 = time.perf_counter()
            session.reset(prompt, seed=i)
            stream = iter(session)
            next(stream)
            raw_ms = (time.perf_counter() - t0) * 1e3
            stream.close()
            _sync(res.device)
            t0 = time.perf_counter()
            s = iter(pipe.stream(prompt, seed=i, frames=args.frames))
            next(s)
            api_ms = (time.perf_counter() - t0) * 1e3
            s.close()
            if i:  # the first of each warms up
                raw.append(raw_ms)
                api.append(api_ms)
        switch, applied, added = {}, {}, {}
        chunks = len(res.config.sampler.chunk_sizes((args.frames + 3) // 4))
        ask_after = max(0, chunks - 3)  # an overlapped DiT thread may apply it one chunk later
        plain_gaps: dict[int, list[float]] = {}
        for i in range(max(1, args.requests)):  # the same streams without a switch: chunk gaps
            last = 0.0
            for chunk in pipe.stream(prompt, seed=i, frames=args.frames):
                plain_gaps.setdefault(chunk.index, []).append(chunk.timings["elapsed"] - last)
                last = chunk.timings["elapsed"]
        for mode in ("swap", "recache"):
            times, extra = [], []
            for i in range(max(1, args.requests)):
                stream = pipe.stream(prompt, seed=i, frames=args.frames)
                last = 0.0
                for chunk in stream:
                    if chunk.index == ask_after:
                        stream.set_prompt(other, mode=mode)
                    if "switch" in chunk.timings:
                        times.append(chunk.timings["switch"])
                        applied.setdefault(mode, []).append(chunk.index)
                        gap = chunk.timings["elapsed"] - last
                        extra.append(gap - statistics.median(plain_gaps[chunk.index]))
                    last = chunk.timings["elapsed"]
            switch[mode] = statistics.median(times)
            added[mode] = statistics.median(extra)
    finally:
        pipe.close()
    med_raw, med_api = statistics.median(raw), statistics.median(api)
    return {
        "config": vars(args),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if res.device == "cuda" else "cpu",
        "raw_first_chunk_ms": med_raw,
        "api_first_chunk_ms": med_api,
        "api_minus_raw_ms": med_api - med_raw,
        "raw_all_ms": raw,
        "api_all_ms": api,
        "switch_ms": switch,
        "switch_added_to_chunk_gap_ms": added,
        "switch_asked_after_chunk": ask_after,
        "switch_applied_before_chunk": applied,
        "note": "recache before chunk k replays k cached chunks (global attention)",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, default=33, help="video frames (4k+1)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", choices=["eager", "compile"])
    p.add_argument("--requests", type=int, default=5, help="timed requests per side (after one warm-up)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    out = measure(args)
    added = out["switch_added_to_chunk_gap_ms"]
    print(
        f"first chunk: raw session {out['raw_first_chunk_ms']:.1f} ms, ropesp.Pipeline "
        f"{out['api_first_chunk_ms']:.1f} ms ({out['api_minus_raw_ms']:+.1f} ms); switch: swap "
        f"{out['switch_ms']['swap']:.1f} ms, recache {out['switch_ms']['recache']:.1f} ms; added to the chunk "
        f"gap: swap {added['swap']:+.1f} ms, recache {added['recache']:+.1f} ms (applied before "
        f"chunks {out['switch_applied_before_chunk']})",
        file=sys.stderr,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
