"""scripts/api_latency.py on the CPU: both sides time a first chunk, both switch modes report a cost."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_latency_script_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("api_latency", ROOT / "scripts" / "api_latency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out.json"
    argv = ["--device", "cpu", "--height", "64", "--width", "64", "--frames", "33", "--requests", "1"]
    assert module.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["raw_first_chunk_ms"] > 0 and result["api_first_chunk_ms"] > 0
    assert len(result["raw_all_ms"]) == len(result["api_all_ms"]) == 1
    assert set(result["switch_ms"]) == {"swap", "recache"} and min(result["switch_ms"].values()) > 0
    assert result["switch_applied_before_chunk"] == {"swap": [1], "recache": [1]}  # serial on the CPU
    assert set(result["switch_added_to_chunk_gap_ms"]) == {"swap", "recache"}
