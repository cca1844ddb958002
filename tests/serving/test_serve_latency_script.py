"""scripts/serve_latency.py runs end to end on the CPU (its numbers are for bench/RESULTS.md, not asserted)."""

import gzip
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.mark.slow
def test_serve_latency_script_reports_both_paths(tmp_path):
    """With the compile backend, as on the GPU: torch.compile also runs inside the backend stub (whose
    embedded Python starts with an ASCII locale; the model switches it to UTF-8)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import serve_latency
    finally:
        sys.path.remove(str(SCRIPTS))
    out = tmp_path / "lat.json"
    args = ["--latent-height", "8", "--latent-width", "8", "--latent-frames", "3", "--requests", "1"]
    args += ["--backend", "compile"]
    trace = tmp_path / "trace"
    server_log = tmp_path / "triton.log"
    argv = [*args, "--json", str(out), "--trace", str(trace), "--server-log", str(server_log)]
    assert serve_latency.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["in_process_first_chunk_ms"] > 0 and res["triton_first_chunk_ms"] > 0
    assert res["triton_total_ms"] >= res["triton_first_chunk_ms"]
    assert res["backend"] == "compile"
    # the breakdown adds up: setup + DiT = the caller's first chunk; the server's own time is inside the
    # client's
    parts = res["in_process_first_chunk_setup_ms"] + res["in_process_first_chunk_dit_ms"]
    assert parts == pytest.approx(res["in_process_first_chunk_ms"], rel=1e-6)
    assert res["in_process_first_chunk_setup_ms"] >= 0
    assert 0 < res["triton_first_chunk_server_ms"] <= res["triton_first_chunk_ms"]
    assert 0 < res["triton_viewer_first_chunk_server_ms"] <= res["triton_viewer_first_chunk_ms"]
    # the model's own account of its load, from the server's log: its phases add up to at most its total,
    # which the server's start-to-ready contains
    phases = dict(res["triton_model_initialize_s"])
    total, steps = phases.pop("total"), phases.pop("import_steps")
    assert set(steps) == {"environment", "numpy", "torch"}
    assert sum(steps.values()) == pytest.approx(phases["imports"], abs=0.03)
    assert "written" in phases.pop("bytecode")
    assert set(phases) == {"imports", "until initialize", "engine and decoder", "warm up"}
    assert 0 < total <= res["triton_load_to_ready_s"]
    assert sum(phases.values()) <= total + 0.05 and phases["engine and decoder"] > 0
    assert "ropesp.request" in (trace / "in_process_request.txt").read_text()
    assert json.loads(gzip.decompress((trace / "in_process_request.json.gz").read_bytes()))["traceEvents"]
