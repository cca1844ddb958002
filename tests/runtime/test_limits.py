"""Bad sizes and rank counts are refused up front: one line naming the flag, exit 2, nothing started."""

from __future__ import annotations

import os

import pytest
import torch

from ropesp.cli import main
from ropesp.errors import ConfigError
from ropesp.limits import check_local_ranks, kv_cache_bytes
from ropesp.parallel import SPLayout
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.settings import RunConfig

GEN = ["generate", "--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--device", "cpu"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--world-size", "0"], "--world-size 0 must be >= 1"),
        (["--world-size", "-1"], "--world-size -1 must be >= 1"),
        (["--world-size", "1000000000"], "--world-size 1000000000 exceeds the 48 tokens of a chunk"),
        (["--latent-frames", "-3"], "--latent-frames -3 must be >= 0"),
        (["--latent-frames", "0"], "an unbounded stream needs a rolling window"),  # 0: until Ctrl-C
        (["--latent-height", "0"], "--latent-height 0 must be >= 1"),
        (["--latent-width", "-2"], "--latent-width -2 must be >= 1"),
        (["--max-frames", "0"], "--max-frames 0 must be >= 1"),
        (["--ulysses-degree", "0"], "--ulysses-degree 0 must be >= 1"),
    ],
)
def test_generate_refuses_bad_sizes(tmp_path, capsys, args, message):
    out = tmp_path / "v.mp4"
    assert main([*GEN, *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ropesp: error: ") and err.count("\n") == 1
    assert message in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--latent-height", "0"], "--latent-height 0 must be >= 1"),
        (["--max-frames", "0"], "--max-frames 0 must be >= 1"),
        (["--world-size", "0"], "--world-size 0 must be >= 1"),
        (["--world-size", "1000000000"], "--world-size 1000000000 exceeds the 192 tokens of a chunk"),
    ],
)
def test_build_refuses_bad_sizes(tmp_path, capsys, args, message):
    out = tmp_path / "engines"
    assert main(["build", "--preset", "tiny", "--backend", "onnx", *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_enormous_video_refused_before_allocating(tmp_path, capsys):
    """3000 frames of the 14B model at 480x832: 2 x 40 layers x 3000 x 1560 tokens x 5120 x 2 bytes."""
    out = tmp_path / "v.mp4"
    args = ["generate", "--preset", "wan2.1-14b", "--latent-frames", "3000", "--dtype", "bfloat16"]
    assert main([*args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the KV cache of 3000 latent frames needs 3570.6 GiB, more than the" in err
    assert err.count("\n") == 1 and not out.exists()


def test_python_api_refuses_zero_sizes_and_huge_caches():
    for kwargs, message in [
        ({"latent_frames": -1}, "--latent-frames -1 must be >= 0"),
        ({"latent_frames": 0}, "an unbounded stream needs a rolling window"),  # 0: until stopped
        ({"max_frames": 0}, "--max-frames 0 must be >= 1"),
        ({"world_size": 0}, "--world-size 0 must be >= 1"),
        ({"latent_height": 0}, "--latent-height 0 must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            resolve(RunConfig.of(preset="tiny", device="cpu", **kwargs))
    with pytest.raises(ConfigError, match="the KV cache of 3000 latent frames needs"):
        resolve(RunConfig.of(preset="wan2.1-14b", latent_frames=3000))


def test_cache_estimate_is_the_allocated_size():
    session = build_session(
        RunConfig.of(preset="tiny", latent_height=8, latent_width=8, latent_frames=6, device="cpu")
    )
    cache = session.executor.state.cache
    res = resolve(RunConfig.of(preset="tiny", latent_height=8, latent_width=8, latent_frames=6, device="cpu"))
    allocated = sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
    assert kv_cache_bytes(res.model, res.geometry.frame_tokens, res.cache, 4, 1) == allocated


def test_layout_choice_is_bounded_by_the_heads():
    assert SPLayout.choose(12, 10**12) == SPLayout(4, 250_000_000_000)  # instant, not a 10^12 loop


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this host has the GPUs")
def test_more_ranks_than_gpus_refused(tmp_path, capsys):
    args = ["generate", "--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--device", "cuda"]
    assert main([*args, "--world-size", "2", "--output", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert (
        "--world-size 2 needs 2 GPUs (one per rank); this host has" in err or "no CUDA GPU is visible" in err
    )


def test_more_cpu_ranks_than_cores_warns(capsys):
    cores = os.cpu_count() or 1
    check_local_ranks(cores, "cpu")
    assert capsys.readouterr().err == ""
    check_local_ranks(cores + 1, "cpu")
    assert f"warning: --world-size {cores + 1} CPU ranks on {cores} cores" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_prompt_refused(tmp_path, capsys, bad):
    prompt = torch.randn(1, 8, 4096) * 0.1
    prompt[0, 3, 5] = bad
    path = tmp_path / "p.pt"
    torch.save(prompt, path)
    out = tmp_path / "v.mp4"
    assert main([*GEN, "--latent-frames", "3", "--prompt-embeds", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "prompt embeddings hold 1 NaN or Inf values; every value must be finite" in err
    assert err.count("\n") == 1 and not out.exists()
    session = build_session(
        RunConfig.of(preset="tiny", latent_height=8, latent_width=8, latent_frames=3, device="cpu")
    )
    with pytest.raises(ConfigError, match="NaN or Inf"):
        session.reset(prompt, seed=0)
