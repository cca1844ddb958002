"""The FP8 attention study scripts run end to end on the CPU at tiny sizes (the device call is not where
they first run): per-chunk errors against exact attention for each variant, the kernel table's rows."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(SCRIPTS / script), *args], check=True, timeout=600)


def test_fp8_attention_drift_per_chunk_on_the_cpu(tmp_path):
    out = tmp_path / "drift.json"
    _run("fp8_attention_drift.py", "--preset", "tiny", "--latent-height", "8", "--latent-width", "8",
         "--latent-frames", "9", "--variants", "sdpa,attn:base,attn:v,cache+p,q", "--json", str(out))  # fmt: skip
    rows = json.loads(out.read_text())["variants"]
    assert list(rows) == ["sdpa", "attn:base", "attn:v", "cache+p", "q"]
    assert rows["sdpa"]["rel_l2_per_chunk"] == [0.0, 0.0, 0.0]
    for name in ("attn:base", "attn:v", "cache+p", "q"):  # e4m3 roundings: small, never zero
        assert all(0 < e < 0.05 for e in rows[name]["rel_l2_per_chunk"]), (name, rows[name])


def test_fp8_attention_accuracy_reference_on_the_cpu(tmp_path):
    out = tmp_path / "acc.json"
    _run("fp8_attention_accuracy.py", "--device", "cpu", "--queries", "32", "--windows", "32,96",
         "--heads", "2", "--head-dim", "16", "--json", str(out))  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["window"] for r in rows] == [32, 96]
    for row in rows:  # the CPU reference is exact attention over the rounded inputs: no kernel error
        assert all(row[fix]["kernel"] < 1e-2 for fix in ("base", "v", "split", "v+split"))
