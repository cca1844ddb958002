"""What a stream's KV cache slot costs on the device, measured against what the engine states.

    python scripts/slot_memory.py --preset wan2.1-1.3b --height 480 --width 832 --local-attn-frames 9 \\
        --sink-frames 3 --backend compile --slots 1,4 --chunks 4 --json out.json

For each slot count S a `ropesp.Pipeline(max_streams=S)` is built in this process (rank 0 of one rank),
then S streams run at once, each from its own thread, for --chunks chunks. Per S: device memory after
the build (weights, S slots, CUDA graph pools once they exist) and the peak while the S streams ran,
both from torch's allocator, in GiB. The slot's measured size is the build's growth per added slot
((built[S] - built[1]) / (S - 1)); the stated size is `ropesp.limits.kv_cache_bytes` (self-attention K
and V: what `max_streams`'s automatic choice and the README count) plus the cross-attention K/V of one
prompt (per layer [1, text_len, dim], K and V). CUDA only: on a CPU the allocator keeps no statistics.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading

import torch

GIB = 2**30


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/slot_memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="wan2.1-1.3b")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--local-attn-frames", type=int, default=9)
    p.add_argument("--sink-frames", type=int, default=3)
    p.add_argument("--backend", default="compile")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--slots", default="1,4", help="slot counts to build, comma-separated, the first >= 1")
    p.add_argument("--chunks", type=int, default=4, help="chunks each stream runs")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    try:
        args.slot_counts = [int(s) for s in args.slots.split(",")]
    except ValueError:
        p.error(f"--slots {args.slots!r}: comma-separated integers, e.g. 1,4")
    if not args.slot_counts or min(args.slot_counts) < 1:
        p.error(f"--slots {args.slots!r}: every count must be >= 1")
    if args.chunks < 1:
        p.error(f"--chunks {args.chunks}: must be >= 1")
    return args


def stated_slot_bytes(pipe) -> tuple[int, int]:
    """(self-attention K/V bytes of one slot as the engine counts them, cross-attention K/V bytes)."""
    from ropesp import limits

    res = pipe.resolved
    kv = limits.kv_cache_bytes(
        res.model, res.geometry.frame_tokens, res.cache, res.cache_itemsize, res.world_size
    )
    cross = 2 * res.model.num_layers * res.model.text_len * res.model.dim * res.dtype.itemsize
    return kv, cross


def run_streams(pipe, streams: int, chunks: int) -> None:
    """streams streams at once, one thread each, chunks chunks each."""
    from ropesp.runtime.prompts import default_prompt_embeds

    errors: list[BaseException] = []
    frames = 4 * pipe.resolved.config.sampler.chunk_frames * chunks - 3
    prompt = default_prompt_embeds(pipe.resolved.model)[0]  # random weights: no text encoder

    def one(seed: int) -> None:
        try:
            for _ in pipe.stream(prompt, seed=seed, frames=frames):
                pass
        except BaseException as e:  # re-raised on the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def measure(args: argparse.Namespace) -> dict:
    import ropesp

    rows = []
    for slots in args.slot_counts:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with ropesp.Pipeline(
            preset=args.preset,
            height=args.height,
            width=args.width,
            local_attn_frames=args.local_attn_frames,
            sink_frames=args.sink_frames,
            backend=args.backend,
            precision=args.precision,
            attention=args.attention,
            device="cuda",
            max_streams=slots,
        ) as pipe:
            built = torch.cuda.memory_allocated() - base
            run_streams(pipe, slots, args.chunks)
            torch.cuda.synchronize()
            after = torch.cuda.memory_allocated() - base
            peak = torch.cuda.max_memory_allocated() - base
            kv, cross = stated_slot_bytes(pipe)
        row = {
            "slots": slots,
            "built_gib": built / GIB,
            "after_streams_gib": after / GIB,
            "peak_gib": peak / GIB,
            "stated_kv_gib": kv / GIB,
            "stated_cross_gib": cross / GIB,
        }
        rows.append(row)
        print(
            f"slots {slots}: built {row['built_gib']:.2f} GiB, after {slots} streams {row['after_streams_gib']:.2f}, "
            f"peak {row['peak_gib']:.2f}; stated per slot {row['stated_kv_gib']:.2f} + {row['stated_cross_gib']:.3f}",
            flush=True,
        )
    one = rows[0]
    for row in rows[1:]:
        added = row["slots"] - one["slots"]
        if added > 0:
            row["measured_per_slot_gib"] = (row["built_gib"] - one["built_gib"]) / added
            row["measured_peak_per_slot_gib"] = (row["peak_gib"] - one["peak_gib"]) / added
            print(
                f"per added slot ({one['slots']} -> {row['slots']}): built {row['measured_per_slot_gib']:.3f} GiB, "
                f"peak {row['measured_peak_per_slot_gib']:.3f} GiB; stated "
                f"{row['stated_kv_gib'] + row['stated_cross_gib']:.3f} GiB",
                flush=True,
            )
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "slot_counts"},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("slot_memory: needs a CUDA device (the CPU allocator keeps no statistics)", file=sys.stderr)
        return 2
    from ropesp.errors import RopespError

    try:
        report = measure(args)
    except RopespError as e:
        print(f"slot_memory: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
