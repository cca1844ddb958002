"""scripts/batch_bench.py on the tiny model on the CPU: a row per batch size with consistent figures, every
stream's batched latents within float32 rounding of the same stream run alone, and bad input refused in
one line naming the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, str(ROOT / "scripts" / "batch_bench.py")]
TINY = ["--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--dtype", "float32",
        "--device", "cpu", "--backend", "eager"]  # fmt: skip

MAX_ABS = 1e-5
"""Batched against alone, float32 on the CPU. Measured (2-core x86 CPU, torch 2.13, 3 chunks of 3 latent
frames, 4 steps + the clean-context pass each): max |d| 1.7e-6 and 1.4e-6, relative L2 3.0e-7 and 2.5e-7
for streams 0 and 1 (latents of mean |x| 0.93, max 5.3). Not 0: with B = 2 the GEMMs have twice the rows and the
BLAS blocks and sums them in another order, and the differences pass through every later forward via
the KV cache. The bounds sit ~6x above the measurement (another CPU's kernels may sum in yet another
order) and far below what a mixing of the streams would give (differences of the latents' own size)."""
REL_L2 = 2e-6


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("batch") / "b.json"
    proc = subprocess.run(
        [*SCRIPT, *TINY, "--batches", "2", "--chunks", "3", "--all-streams", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=out.parent,
        # one thread: on a busy 2-core host two OpenMP threads wait on each other's time slices (a tiny
        # chunk took 1.9 s instead of 28 ms); the latents are the same either way
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    res["stdout"] = proc.stdout
    return res


def test_a_row_per_batch_size_with_consistent_times(result):
    assert result["device"] == "cpu" and result["torch"]
    assert result["batches"] == [1, 2]  # the baseline B = 1 always runs
    assert result["chunk_frames"] == [3, 3, 3] and result["steady_chunks"] == [
        2
    ]  # window 9: full at the last
    rows = result["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for row in rows:
        assert len(row["chunk_ms"]) == 3 and min(row["chunk_ms"]) > 0
        assert row["first_chunk_ms"] == row["chunk_ms"][0] and row["steady_ms"] == row["chunk_ms"][2]
        assert row["per_stream_ms"] == pytest.approx(row["steady_ms"] / row["batch"])
        assert row["prompt_ms"] > 0 and row["warmup_first_chunk_ms"] > 0
        assert row["rerun_max_abs"] <= MAX_ABS  # the same inputs twice at one B
    one, two = rows
    assert one["vs_sequential"] == 1.0
    assert two["vs_sequential"] == pytest.approx(2 * one["steady_ms"] / two["steady_ms"])
    assert "exactness" not in one
    lines = result["stdout"].strip().splitlines()
    assert lines[-3].split()[:3] == ["B", "first", "ms"] and lines[-1].split()[0] == "2"


def test_batched_streams_match_each_stream_alone(result):
    exact = result["rows"][1]["exactness"]
    assert [e["stream"] for e in exact] == [0, 1]
    for e in exact:
        assert e["max_abs"] <= MAX_ABS and e["rel_l2"] <= REL_L2, e


@pytest.mark.parametrize(
    "args, flag", [(["--batches", "0"], "--batches 0"), (["--batches", "1,x"], "--batches 1,x")]
)
def test_bad_batches_is_one_line(args, flag):
    proc = subprocess.run([*SCRIPT, *TINY, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"batch_bench: error: {flag}:"), proc.stderr
