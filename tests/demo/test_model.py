"""The shipped demo model through the real runtime: it makes what the prompt says, on every path.

The paths are compared on a fixed subset, 8 of the 32 evaluation pairs (every fourth); the target is
checked on all 32, as `python -m ropesp.demo.evaluate` scores them (bench/2026-12-02-run9/)."""

from __future__ import annotations

import pytest
import torch
from demo_worker import generate_pairs, on_ranks

from ropesp.demo import default_checkpoint, has_default_weights, is_demo_model
from ropesp.demo.evaluate import eval_pairs, evaluate, generate_latents, mean_score, score_pairs
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.settings import RunConfig

PAIRS = eval_pairs()[::4]
shipped = pytest.mark.skipif(
    not has_default_weights(),
    reason="the demo weights are not trained into this tree yet (ropesp.demo.train)",
)
TARGET = 0.9
"""Issue 21's target for the mean score on the 32 pairs (the shipped weights: 0.920, eager fp32 on the
CPU; 0.910 bf16 on an H200)."""
PATH_TOLERANCE = 0.02
"""Every runtime path must score within this of eager on one rank."""


def _session(**overrides):
    cfg = RunConfig.of(checkpoint=str(default_checkpoint()), device="cpu", dtype="float32", **overrides)
    return build_session(cfg)


@pytest.fixture(scope="module")
def eager():
    """(latents per pair, mean score) of the shipped model, eager on one rank."""
    with torch.no_grad():
        latents = generate_latents(_session(), PAIRS)
    return latents, mean_score(score_pairs(latents, PAIRS))


@shipped
def test_shipped_weights_are_the_demo_model():
    res = resolve(RunConfig.of(checkpoint=str(default_checkpoint())))
    assert is_demo_model(res.model) and not res.random_weights
    assert (res.geometry.latent_height, res.geometry.latent_width, res.latent_frames) == (24, 24, 9)
    assert (default_checkpoint() / "diffusion_pytorch_model.safetensors").stat().st_size <= 10_000_000


@pytest.fixture(scope="module")
def eager_all(eager):
    """Mean score of the shipped model on all 32 pairs, eager on one rank (PAIRS' from `eager`)."""
    rest = [pair for i, pair in enumerate(eval_pairs()) if i % 4]  # the 24 pairs PAIRS leaves out
    with torch.no_grad():
        results = score_pairs(generate_latents(_session(), rest), rest)
    results += score_pairs(eager[0], PAIRS)
    assert len(results) == 32
    return mean_score(results)


@shipped
def test_shipped_model_makes_what_the_prompt_says(eager_all):
    assert eager_all >= TARGET


def test_untrained_model_scores_near_zero():
    cfg = RunConfig.of(preset="demo", device="cpu", dtype="float32")
    with torch.no_grad():
        results = evaluate(build_session(cfg), PAIRS[:4])
    assert mean_score(results) <= 0.05


@shipped
def test_rolling_window_keeps_the_score(eager_all):
    """The window is not the same computation (each chunk sees the previous chunk only), so it is held to
    not losing the score, on all 32 pairs: on 8 a single frame of a pair with 6 scored frames moves the
    mean by 1/48 = 0.021, over the tolerance (the weights before the shipped ones: 0.924 against 0.944 on
    PAIRS, 0.974 against 0.974 on all 32, one frame lost in one pair and one gained in another;
    bench/RESULTS.md, twenty-fourth session; the shipped ones: 0.974 against 0.979 on all 32, twenty-sixth
    session)."""
    session = _session(local_attn_frames=6)
    with torch.no_grad():
        results = evaluate(session, eval_pairs())
    assert mean_score(results) >= eager_all - PATH_TOLERANCE


@shipped
@pytest.mark.parametrize(("world_size", "sp_rope"), [(2, "local"), (4, "allgather")])
def test_sequence_parallel_keeps_the_latents_and_score(eager, tmp_path, world_size, sp_rope):
    pairs = PAIRS if world_size == 2 else PAIRS[::2]  # 4 ranks on 2 cores: half the pairs
    latents = on_ranks(world_size, generate_pairs, pairs, {"sp_rope": sp_rope})
    want = eager[0][:: len(PAIRS) // len(pairs)]
    for a, b in zip(latents, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # fp32 reduction order only
    got_score, want_score = (mean_score(score_pairs(x, pairs)) for x in (latents, want))
    assert abs(got_score - want_score) <= PATH_TOLERANCE


def test_position_embedding_is_sharded_right_by_sequence_parallel(tmp_path):
    """The demo architecture (absolute position embedding added before the token shard) on random
    weights: two ranks give one rank's latents."""
    pairs = PAIRS[:2]
    cfg = {"checkpoint": None, "preset": "demo"}
    with torch.no_grad():
        single = generate_latents(build_session(RunConfig.of(device="cpu", dtype="float32", **cfg)), pairs)
    for a, b in zip(on_ranks(2, generate_pairs, pairs, cfg), single):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
