"""`ropesp build --backend aoti` on the CPU (tiny, no autotuning) for 1 and 2 ranks: `ropesp generate
--backend aoti` equals eager; on CUDA (marked gpu) the CUDA-graph replay equals the uncaptured run."""

from __future__ import annotations

import pytest
import torch
from engine_builds import run_generate

from ropesp.manifest import Manifest

ATOL = 1e-4


@pytest.mark.parametrize("world_size", [1, 2])
def test_generate_aoti_equals_eager(builds, eager_latents, world_size, tmp_path):
    root = builds("aoti", world_size)
    manifest = Manifest.load(root)
    assert manifest.backend == "aoti" and manifest.device == "cpu" and manifest.gpu_arch == "cpu"
    assert all(f.endswith(".pt2") for r in manifest.ranks for f in r.files.values())
    latents = run_generate(tmp_path, "--engines", str(root), "--world-size", str(world_size))  # backend: aoti
    torch.testing.assert_close(latents, eager_latents, rtol=0, atol=ATOL)


def test_aoti_ranks_share_all_but_the_rope_segment(builds):
    """Only `pre` (RopeSP's first_token) differs between ranks; the other graphs are built once."""
    root = builds("aoti", 2)
    log = (root / "build.log").read_text()
    assert log.count("copied") == 3  # rank 1's embed, post and head
    manifest = Manifest.load(root)
    digests = [{s: manifest.files[p] for s, p in r.files.items()} for r in manifest.ranks]
    assert [s for s in digests[0] if digests[0][s] != digests[1][s]] == ["pre"]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (AOTInductor CUDA build + CUDA graphs)"
)
def test_aoti_cuda_graphs_equal_uncaptured_and_eager(tmp_path, prompt):
    from ropesp.export.build import BuildConfig, build
    from ropesp.runtime.pipeline import build_session
    from ropesp.settings import RunConfig

    out = build(BuildConfig.of(str(tmp_path / "e"), "aoti", preset="tiny", latent_height=10, latent_width=14,
                            max_frames=6, dtype="float32", device="cuda"))  # fmt: skip
    common = dict(
        preset="tiny", latent_height=10, latent_width=14, latent_frames=6, device="cuda", dtype="float32"
    )
    results = {}
    for name, extra in {"eager": {}, "aoti": dict(engines=str(out), cuda_graphs=False),
                        "graphs": dict(engines=str(out), cuda_graphs=True)}.items():  # fmt: skip
        session = build_session(RunConfig.of(**common, **extra))
        session.reset(prompt, seed=3)
        results[name] = session.generate()
        if name == "graphs":
            assert len(session.executor.graphs) == 2  # one per chunk's cache slot plan
            session.reset(seed=3)  # replay: same stream again
            torch.testing.assert_close(session.generate(), results[name], rtol=0, atol=0)
    torch.testing.assert_close(results["aoti"], results["eager"], rtol=0, atol=1e-3)
    torch.testing.assert_close(results["graphs"], results["aoti"], rtol=0, atol=1e-5)


def test_bench_times_engine_configs(builds, tmp_path):
    """`ropesp bench` runs the engine configurations beside the eager one (CPU: no graphs to capture)."""
    import json

    from engine_builds import FRAMES, GRID

    from ropesp.cli import main

    js = tmp_path / "b.json"
    configs = "optimized,compiled-nograph,compiled"
    args = ["bench", "--engines", str(builds("aoti", 1)), *GRID, *FRAMES, "--configs", configs]
    assert main([*args, "--repeat", "1", "--no-decode", "--json", str(js)]) == 0
    results = json.loads(js.read_text())["results"]
    assert list(results) == configs.split(",")
    assert all(r["fps_dit"] > 0 and len(r["chunk_ms"]) == 2 for r in results.values())
