"""Fresh process to first chunk, per path, split into set-up and the stream's first chunk.

    python scripts/plot_cold_start.py OUT.png --engines A.json [B.json ...] --compile C.json [...] \\
        [--triton T.json] [--skip-first] [--target SECONDS] [--title TEXT]

Reads what `scripts/cold_start.py --json` writes (runs of fresh `ropesp generate` processes: spawn to
first chunk, and the process's own time to first chunk from the stream's start) and what
`scripts/serve_latency.py --json` writes for a Triton cold start (server start to ready, then the first
request's first chunk). Each path's bar is its median run (the lower middle of an even count), stacked
as set-up (interpreter, imports, session build) plus the first chunk; `--skip-first` leaves out run 0 of
each file that holds more than one (the first process after an install, which compiles bytecode). It prints every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _runs(files: list[Path], skip_first: bool) -> list[dict]:
    runs = []
    for f in files:
        rows = json.loads(f.read_text())["runs"]
        runs += rows[1:] if skip_first and len(rows) > 1 else rows
    return [r for r in runs if r.get("exit_code") == 0 and r.get("setup_s") is not None]


def _median_split(runs: list[dict]) -> tuple[float, float]:
    """(set-up s, first chunk s) of the run whose total is the median."""
    ordered = sorted(runs, key=lambda r: r["process_to_first_chunk_s"])
    mid = ordered[(len(ordered) - 1) // 2]
    return mid["setup_s"], mid["first_chunk_in_stream_ms"] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--engines", type=Path, nargs="+", required=True)
    ap.add_argument("--compile", type=Path, nargs="+", required=True)
    ap.add_argument("--triton", type=Path, help="serve_latency.py JSON of a Triton cold start")
    ap.add_argument("--skip-first", action="store_true", help="leave out run 0 of each file of several runs")
    ap.add_argument("--target", type=float, default=3.0, help="the target line, seconds")
    ap.add_argument("--title", default="fresh process to first chunk")
    args = ap.parse_args()

    bars = []  # (label, set-up s, first chunk s)
    for label, files in (("ropesp generate --engines", args.engines), ("--backend compile", args.compile)):
        runs = _runs(files, args.skip_first)
        if not runs:
            raise SystemExit(
                f"plot_cold_start.py: no successful run in the {label!r} files {[str(f) for f in files]}"
            )
        totals = ", ".join(f"{r['process_to_first_chunk_s']:.2f}" for r in runs)
        print(f"{label}: {len(runs)} runs, process to first chunk {totals} s")
        bars.append((label, *_median_split(runs)))
    if args.triton:
        cold = json.loads(args.triton.read_text())
        ready, first = cold["triton_load_to_ready_s"], cold["triton_cold_first_chunk_ms"] / 1e3
        print(f"Triton: server start to ready {ready:.2f} s, first chunk {first * 1e3:.0f} ms after")
        bars.append(("Triton, serve-repo --engines", ready, first))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    labels = [b[0] for b in bars]
    ys = range(len(bars))
    ax.barh(ys, [b[1] for b in bars], color="#8da0cb", label="set-up (process start, imports, session build)")
    ax.barh(ys, [b[2] for b in bars], left=[b[1] for b in bars], color="#fc8d62", label="first chunk")
    for y, (_, setup, first) in zip(ys, bars):
        ax.text(setup + first + 0.15, y, f"{setup + first:.1f} s", va="center", fontsize=9)
    ax.axvline(args.target, color="grey", linestyle="--", linewidth=1)
    ax.text(args.target, -0.55, f" target {args.target:g} s", color="grey", fontsize=8, va="bottom")
    ax.set_yticks(list(ys), labels)
    ax.set_xlabel("seconds")
    ax.set_title(args.title, fontsize=10)
    ax.set_xlim(0, max(b[1] + b[2] for b in bars) * 1.15)
    ax.set_ylim(len(bars) - 0.5, -0.75)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
