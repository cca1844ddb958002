"""scripts/load_bench.py on the tiny model through the demo's real WebSocket: every client gets exactly the
chunks it asked for, the figures are consistent with them, and a client beyond the engine's KV cache slots
is counted as refused with the engine's reason."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--device", "cpu"]


def _load_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_bench.py"), *TINY, *args,
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_clients_share_the_engine_and_each_gets_its_chunks(tmp_path):
    res = _load_bench(tmp_path, "--clients", "1,2", "--chunks", "3")
    assert res["front"] == "demo" and res["config"]["streams"]["max_streams"] == 2
    for n in ("1", "2"):
        row = res["results"][n]
        assert row["clients"] == int(n) and row["refused"] == 0
        assert [c["frames"] for c in row["per_client"]] == [9 + 12 + 12] * int(n)
        assert all(c["fps"] > 0 and 0 < c["ttff_ms"] < 60_000 for c in row["per_client"])
        assert row["fps_min"] <= row["fps_median"] and row["fps_sum"] == pytest.approx(
            sum(c["fps"] for c in row["per_client"])
        )
        assert row["first_frame_p50_ms"] <= row["first_frame_p95_ms"]
    assert res["results"]["1"]["sum_vs_one_stream"] == 1.0


def test_trace_profiles_the_engine_thread_and_two_pieces_count_as_one_chunk(tmp_path):
    """--trace: the first round's gzipped Chrome trace holds the engine thread's ranges (the stream's open
    and its chunks), not only the thread that started the profiler; the served default hands the first
    chunk over in two pieces, which the clients count as one chunk."""
    trace = tmp_path / "trace.json.gz"
    res = _load_bench(tmp_path, "--clients", "1", "--chunks", "2", "--trace", str(trace))
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    names = {e.get("name") for e in events}
    assert "ropesp.dit.chunk0" in names and any(str(n).startswith("ropesp.open") for n in names)
    (client,) = res["results"]["1"]["per_client"]
    assert client["frames"] == 9 + 12
    assert client["first_chunk_dit_ms"] > 0 and client["first_chunk_decode_ms"] >= 0


def test_a_client_beyond_the_slots_is_refused_with_the_reason(tmp_path):
    res = _load_bench(tmp_path, "--clients", "2", "--chunks", "8", "--max-streams", "1")
    row = res["results"]["2"]
    assert row["refused"] == 1 and len(row["per_client"]) == 2
    assert "at capacity" in row["refusals"][0] and "max_streams=1" in row["refusals"][0]
    served = [c for c in row["per_client"] if not c.get("refused")]
    assert [c["frames"] for c in served] == [9 + 7 * 12]


def test_triton_front_spreads_streams_over_two_instances(tmp_path):
    """The Triton front on a real tritonserver: two engines of one slot each as model instances, two
    clients at once: both served (one per instance), each its whole stream."""
    pytest.importorskip("tritonclient.grpc")
    from ropesp.errors import BackendUnavailableError
    from ropesp.serving.server import find_triton

    try:
        find_triton()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    res = _load_bench(
        tmp_path,
        "--front",
        "triton",
        "--instances",
        "2",
        "--max-streams",
        "1",
        "--clients",
        "2",
        "--chunks",
        "3",
    )
    assert res["front"] == "triton" and res["instances"] == 2
    row = res["results"]["2"]
    assert row["refused"] == 0, row
    assert [c["frames"] for c in row["per_client"]] == [9 + 12 + 12] * 2


def test_errors_are_one_line(tmp_path):
    """A Triton home without Triton and bad --clients: one line each, exit 2, no traceback."""
    script = [sys.executable, str(ROOT / "scripts" / "load_bench.py"), *TINY]
    env = dict(os.environ, ROPESP_TRITON_HOME=str(tmp_path))
    runs = [
        (["--front", "triton", "--clients", "1"], env, f"ROPESP_TRITON_HOME={tmp_path} holds no Triton"),
        (["--clients", "1,x"], None, "--clients 1,x: give comma-separated client counts"),
        (["--front", "triton", "--trace", "t.json.gz"], None, "--trace profiles the demo's engine"),
    ]
    for args, environ, message in runs:
        proc = subprocess.run([*script, *args], capture_output=True, text=True, timeout=120, env=environ)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
