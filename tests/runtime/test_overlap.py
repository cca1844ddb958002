"""`--sp-comm overlap`: the chunk in two pipelined token halves equals the fused Ulysses step.

fp32 on the CPU (gloo). The halves change only how many rows each GEMM and attention call holds, so
results differ from the fused exchange by rounding (~1e-7 relative); 1e-5 on latents of magnitude ~1
bounds that over every forward of the video.
"""

from __future__ import annotations

import pytest
import torch

from ropesp.cli import main
from ropesp.runtime.overlap import split_point

ATOL = 1e-5


def _generate(tmp_path, *extra: str, height: int = 8, width: int = 10, frames: int = 6) -> torch.Tensor:
    out = tmp_path / f"l{len(list(tmp_path.glob('l*.pt')))}.pt"
    args = ["generate", "--latent-frames", str(frames), "--latent-height", str(height),
            "--latent-width", str(width), "--seed", "3", "--output", str(tmp_path / "v.mp4"),
            "--latents-out", str(out)]  # fmt: skip
    assert main([*args, *extra]) == 0
    return torch.load(out)


@pytest.mark.parametrize("world", ["2", "3"])
def test_overlap_equals_fused(tmp_path, world):
    fused = _generate(tmp_path, "--world-size", world)
    overlap = _generate(tmp_path, "--world-size", world, "--sp-comm", "overlap")
    torch.testing.assert_close(overlap, fused, rtol=0, atol=ATOL)


def test_overlap_with_padded_shards_and_rolling_window_equals_single_rank(tmp_path):
    # 6x6 latents: 9 tokens per frame, 27 per chunk -> 14 + 13 real tokens on 2 ranks (one padded row),
    # halves of 7; a 6-frame window with 3 sink frames rolls the cache inside the video
    shape = dict(height=6, width=6, frames=12)
    window = ("--local-attn-frames", "6", "--sink-frames", "3")
    single = _generate(tmp_path, *window, **shape)
    overlap = _generate(tmp_path, *window, "--world-size", "2", "--sp-comm", "overlap", **shape)
    torch.testing.assert_close(overlap, single, rtol=0, atol=ATOL)


def test_overlap_compiled_equals_eager_fused(tmp_path):
    fused = _generate(tmp_path, "--world-size", "2")
    compiled = _generate(tmp_path, "--world-size", "2", "--sp-comm", "overlap", "--backend", "compile")
    torch.testing.assert_close(compiled, fused, rtol=0, atol=ATOL)


def test_split_point_gives_half_a_the_odd_row():
    assert [split_point(n) for n in (1, 2, 7, 8)] == [1, 1, 4, 4]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--ulysses-degree", "1", "--ring-degree", "2"), "ring degree 2"),
        (("--sp-rope", "allgather"), "--sp-rope allgather"),
    ],
)
def test_overlap_refuses_layouts_it_cannot_pipeline(tmp_path, capsys, extra, needle):
    args = ["generate", "--latent-frames", "3", "--latent-height", "8", "--latent-width", "10",
            "--output", str(tmp_path / "v.mp4"), "--world-size", "2", "--sp-comm", "overlap", *extra]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--sp-comm overlap" in err and needle in err


def test_overlap_refuses_engines(tmp_path):
    from ropesp.errors import ConfigError
    from ropesp.runtime.overlap import check_overlap

    with pytest.raises(ConfigError, match="engines run the fused exchange"):
        check_overlap("local", 1, "aoti")
