"""scripts/serve_latency.py runs end to end on the CPU (its numbers are for bench/RESULTS.md, not asserted)."""

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
    assert serve_latency.main([*args, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["in_process_first_chunk_ms"] > 0 and res["triton_first_chunk_ms"] > 0
    assert res["triton_total_ms"] >= res["triton_first_chunk_ms"]
    assert res["backend"] == "compile"
