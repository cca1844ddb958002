"""Cold start as a user meets it: a fresh `ropesp generate` process, from its spawn to its first chunk.

    python scripts/cold_start.py --json cold.json --runs 2 -- --engines engines/ --frames 81
    python scripts/cold_start.py --json cold.json -- --backend compile --preset wan2.1-1.3b ...

Everything after `--` goes to `ropesp generate`. The first chunk is the moment the progress bar first
shows one finished chunk on stderr (tqdm's "1/N"), read as the bytes arrive; the process's own report
("time to first chunk", measured from the stream's start) is parsed too, so the JSON splits the cold
start into process start-up + session build (setup) and the chunk itself.
`--profile FILE` runs one more process, after the timed ones, under cProfile (python -m cProfile) and
keeps the stats: a warm disk cache and written bytecode, as the timed runs after the first meet them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

FIRST = re.compile(rb"chunks:[^\r\n]*?\b1/\d+")
REPORT = re.compile(r"time to first chunk: ([0-9.]+) ms")
FPS = re.compile(r"in ([0-9.]+) s: ([0-9.]+) FPS")


def one_run(generate_args: list[str], profile: Path | None) -> dict:
    cmd = [sys.executable]
    if profile is not None:
        cmd += ["-m", "cProfile", "-o", str(profile)]
    cmd += ["-m", "ropesp.cli", "generate", *generate_args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, first_s = b"", None
    assert proc.stderr is not None
    while True:
        block = proc.stderr.read1(4096)
        if not block:
            break
        seen += block
        if first_s is None and FIRST.search(seen):
            first_s = time.perf_counter() - t0
    code = proc.wait()
    total_s = time.perf_counter() - t0
    text = seen.decode(errors="replace")
    report = REPORT.search(text)
    fps = FPS.search(text)
    row = {
        "exit_code": code,
        "process_to_first_chunk_s": first_s,
        "first_chunk_in_stream_ms": float(report.group(1)) if report else None,
        "process_s": total_s,
        "stream_s": float(fps.group(1)) if fps else None,
        "fps": float(fps.group(2)) if fps else None,
        "stderr_tail": text.replace("\r", "\n").splitlines()[-12:],
    }
    if first_s is not None and report:
        row["setup_s"] = first_s - float(report.group(1)) / 1e3
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1, help="fresh processes, one after another")
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--profile", type=Path, help="cProfile stats of one extra run after the timed ones")
    p.add_argument(
        "generate_args", nargs=argparse.REMAINDER, help="-- then the arguments of `ropesp generate`"
    )
    args = p.parse_args()
    gen = args.generate_args[1:] if args.generate_args[:1] == ["--"] else args.generate_args
    if args.runs < 1:
        p.error(f"--runs {args.runs}: give at least 1")
    rows = [one_run(gen, None) for _ in range(args.runs)]
    if args.profile is not None:
        one_run(gen, args.profile)
    for i, row in enumerate(rows):
        print(
            f"run {i}: exit {row['exit_code']}, first chunk {row['process_to_first_chunk_s']} s after spawn "
            f"(in-stream {row['first_chunk_in_stream_ms']} ms), {row['fps']} FPS, process {row['process_s']:.1f} s"
        )
        if row["exit_code"] != 0:
            print("\n".join(row["stderr_tail"]))
    if args.profile is not None and args.profile.exists():
        import pstats

        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(25)
    if args.json:
        args.json.write_text(json.dumps({"generate_args": gen, "runs": rows}, indent=2))
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
