"""scripts/vae_bench.py's fast variants run end to end on the CPU at a tiny size (a device call must not be
the first place they run): the fast decoder's frames equal the eager decoder's there (fp32, exact)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vae_bench.py"


def test_vae_bench_fast_variants_on_the_cpu(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "vae.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dtype", "float32", "--latent-height", "4",
         "--latent-width", "4", "--latent-frames", "6", "--tiny", "--repeat", "1", "--fp32-reference",
         "--variants", "eager,fast,fast-eager", "--json", str(out)],
        check=True, timeout=600,
    )  # fmt: skip
    res = json.loads(out.read_text())["results"]
    assert list(res) == ["eager", "fast", "fast-eager"]
    assert all(r["frames"] == 21 and len(r["chunk_ms"]) == 2 for r in res.values())
    assert res["fast"]["max_abs_vs_first"] == res["fast-eager"]["max_abs_vs_first"] == 0.0
    assert res["eager"]["vs_fp32_max"] == 0.0  # the fp32 reference is the eager decoder itself here
