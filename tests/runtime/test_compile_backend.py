"""`--backend compile`: regional torch.compile of the model (+ CUDA graphs on GPU) equals eager.

fp32 on the CPU: Inductor reorders reductions and fuses elementwise chains, so results differ from
eager by rounding only (~1e-6 on latents of magnitude ~1 after 15 forwards); 1e-5 bounds that.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from ropesp.cli import main
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

COMMON = dict(preset="tiny", latent_frames=9, latent_height=8, latent_width=10, device="cpu", dtype="float32")
ATOL = 1e-5


def _generate(cfg: RunConfig, prompt) -> tuple[torch.Tensor, object]:
    session = build_session(cfg)
    session.reset(prompt, seed=5)
    return session.generate(), session


def test_compile_equals_eager_and_never_recompiles_per_chunk(prompt):
    eager, _ = _generate(RunConfig.of(**COMMON), prompt)
    torch._dynamo.reset()
    counters.clear()
    compiled, session = _generate(RunConfig.of(**COMMON, backend="compile"), prompt)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=ATOL)
    # pre_attention, post_attention (shared by both layers) and the head: one graph each for 3
    # chunks x 5 forwards (start_frame is a device tensor, not a guarded constant)
    assert counters["stats"]["unique_graphs"] == 3
    session.reset(prompt, seed=5)  # a second stream reuses everything
    torch.testing.assert_close(session.generate(), compiled, rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 3


def test_compile_rolling_window_equals_eager(prompt):
    """A rolling window with sink frames: the cache rolls between forwards (outside compiled regions)."""
    rolling = dict(COMMON, latent_frames=12, local_attn_frames=6, sink_frames=3)
    eager, _ = _generate(RunConfig.of(**rolling), prompt)
    compiled, _ = _generate(RunConfig.of(**rolling, backend="compile"), prompt)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=ATOL)


def test_compile_with_two_ranks_equals_eager(tmp_path, prompt):
    def run(*extra: str) -> torch.Tensor:
        out = tmp_path / f"l{len(list(tmp_path.glob('l*')))}.pt"
        args = ["generate", "--preset", "tiny", "--latent-frames", "6", "--latent-height", "8", "--latent-width", "10",
                "--seed", "2", "--output", str(tmp_path / "v.mp4"), "--latents-out", str(out), "--overwrite"]  # fmt: skip
        assert main([*args, *extra]) == 0
        return torch.load(out)

    torch.testing.assert_close(run("--backend", "compile", "--world-size", "2"), run(), rtol=0, atol=ATOL)


def test_compile_refuses_engines(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    assert main(["generate", "--backend", "compile", "--engines", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--engines" in err or "manifest" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_compile_cuda_graphs_equal_uncaptured(prompt):
    cuda = dict(COMMON, device="cuda")
    plain, _ = _generate(RunConfig.of(**cuda, backend="compile", cuda_graphs=False), prompt)
    graphed, session = _generate(RunConfig.of(**cuda, backend="compile"), prompt)
    assert len(session.executor.graphs) == 3  # one per chunk position's cache slot plan
    torch.testing.assert_close(graphed, plain, rtol=0, atol=ATOL)
    session.reset(prompt, seed=5)  # replays only
    torch.testing.assert_close(session.generate(), graphed, rtol=0, atol=0)
