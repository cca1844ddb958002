"""Sequence parallelism on spawned gloo worlds: every world size and mode equals one rank."""

import os
import subprocess
import sys
import time

import pytest
import sp_worker
import torch

from ropesp.errors import ConfigError
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.runtime.ranks import RankGroup

ALL_MODES = ("optimized", "baseline", "rolling", "iff")
LAYERS = 2  # tiny preset


@pytest.fixture(scope="module")
def single_rank(prompt):
    out = {}
    for mode in ALL_MODES:
        session = build_session(sp_worker.base_config(**sp_worker.MODES[mode]))
        session.reset(prompt, seed=3)
        out[mode] = session.generate()
    return out


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sp_equals_single_rank(world_size, single_rank, prompt, tmp_path):
    # grid 5x7 = 35 tokens per frame, 105 per chunk: not divisible by 2 or 4 (tail padding)
    result = sp_worker.on_ranks(world_size, sp_worker.run_modes, prompt, ALL_MODES)
    for mode in ALL_MODES:
        # fp32; the only difference is the allgather baseline's float64 RoPE and reduction order
        torch.testing.assert_close(result["latents"][mode], single_rank[mode], rtol=0, atol=1e-5, msg=mode)
    counts = result["counts"]
    # optimized: ONE all-to-all into and ONE out of each block's attention, one all-gather at the head
    assert counts["optimized"] == {"all_to_all": 2 * LAYERS, "all_gather": 1}
    # baseline: q, k, v in three all-to-alls; q and k all-gathered for the reference RoPE
    assert counts["baseline"] == {"all_to_all": 4 * LAYERS, "all_gather": 2 * LAYERS + 1}


def test_single_rank_modes_agree(single_rank):
    torch.testing.assert_close(single_rank["baseline"], single_rank["optimized"], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("world_size", "ring", "layout"),
    [(5, None, (1, 5)), (8, None, (4, 2)), (6, None, (6, 1)), (4, 2, (2, 2))],
)
def test_hybrid_ulysses_ring_equals_single_rank(world_size, ring, layout, single_rank, prompt, tmp_path):
    cfg = resolve(sp_worker.base_config(world_size=world_size, ring_degree=ring))
    assert (cfg.layout.ulysses, cfg.layout.ring) == layout
    modes = ("optimized", "rolling") if world_size != 4 else ("optimized", "baseline", "rolling", "iff")
    result = sp_worker.on_ranks(world_size, sp_worker.run_modes, prompt, modes, ring)
    for mode in modes:
        # fp32; log-sum-exp merging of ring partials changes only the summation order
        torch.testing.assert_close(result["latents"][mode], single_rank[mode], rtol=0, atol=1e-5, msg=mode)
    u, r = layout
    counts = result["counts"]["optimized"]
    assert counts.get("all_to_all", 0) == (2 * LAYERS if u > 1 else 0)
    assert counts.get("ring_p2p", 0) == (r - 1) * LAYERS
    assert counts["all_gather"] == 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            dict(world_size=8, ulysses_degree=8),
            "--ulysses-degree 8 does not divide the model's 12 attention heads",
        ),
        (dict(world_size=8, ulysses_degree=3, ring_degree=2), "must equal the world size 8"),
        (dict(world_size=6, ring_degree=4), "--ring-degree 4 must be a positive divisor of the world size 6"),
        (dict(world_size=5, ring_degree=1), "valid Ulysses degrees for world size 5: [1]"),
    ],
)
def test_bad_hybrid_layouts_are_refused(kw, message):
    with pytest.raises(ConfigError) as err:
        resolve(sp_worker.base_config(**kw))
    assert message in str(err.value)


def test_bad_layout_every_rank_exits():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="--ulysses-degree 8 x --ring-degree 0 must equal the world size 4"):
        sp_worker.on_ranks(4, sp_worker.build_only, 8)
    assert time.monotonic() - t0 < 120


def test_cli_world_size_must_match_launcher_env():
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    proc = subprocess.run(
        [sys.executable, "-m", "ropesp.cli", "generate", "--world-size", "3", "--output", os.devnull],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--world-size 3 disagrees with WORLD_SIZE=2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_crashing_rank_takes_every_rank_down_promptly():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        with RankGroup(2, "cpu") as group:
            (worker,) = group.workers
            try:
                group.call(sp_worker.fail_on_rank1)
            except RuntimeError as exc:
                assert group.failure(exc) == "rank 1 exited with status 1"
                raise
    assert worker.poll() is not None
    assert time.monotonic() - t0 < 60, "a rank blocked in a collective must not keep the job alive"
