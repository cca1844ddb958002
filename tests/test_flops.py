"""Matrix FLOPs of a video (ropesp/flops.py): a hand-checked forward, the window, and docs/PLATFORM.md's floor."""

import pytest

from ropesp.config import CacheConfig, ModelConfig, preset
from ropesp.flops import forward_flops, video_flops
from ropesp.settings import SamplerConfig


def test_one_forward_by_hand():
    cfg = ModelConfig(dim=4, ffn_dim=8, num_heads=2, num_layers=1, text_len=3)
    got = forward_flops(cfg, tokens=5, attended=10)
    # blocks: 2*5*4*(6*4 + 2*8) = 1600; patch embed + head: 2*5*4*(1*2*2)*(16 + 16) = 5120
    assert got == {"gemm": 1600.0 + 5120.0, "attention": 4.0 * 5 * 4 * (10 + 3)}


def test_video_counts_forwards_and_the_window():
    cfg = ModelConfig(dim=4, ffn_dim=8, num_heads=2, num_layers=1, text_len=3)
    sampler = SamplerConfig()  # 4 steps, chunks of 3 frames
    per = lambda frames: forward_flops(cfg, 3 * 10, frames * 10)  # noqa: E731  (10 tokens per frame)
    glob = video_flops(cfg, 10, sampler, 9, CacheConfig(9))
    assert glob["gemm"] == (5 + 5 + 4) * per(3)["gemm"]  # the last clean pass is skipped
    assert glob["attention"] == 5 * per(3)["attention"] + 5 * per(6)["attention"] + 4 * per(9)["attention"]
    rolling = video_flops(cfg, 10, sampler, 9, CacheConfig(9, local_attn_frames=6, sink_frames=3))
    assert rolling["attention"] == 5 * per(3)["attention"] + 5 * per(6)["attention"] + 4 * per(6)["attention"]
    assert rolling["total"] == rolling["gemm"] + rolling["attention"]


def test_wan_1_3b_480p_matches_the_documented_floor():
    cfg = preset("wan2.1-1.3b")[0]
    tokens = 3 * 30 * 52
    assert forward_flops(cfg, tokens, tokens)["gemm"] == pytest.approx(11.7e12, rel=0.01)
    video = video_flops(cfg, 30 * 52, SamplerConfig(), 21, CacheConfig(21), skip_final_refresh=False)
    assert video["total"] == pytest.approx(1.0e15, rel=0.02)  # 7 chunks x 5 forwards: about 1.0 PFLOP
