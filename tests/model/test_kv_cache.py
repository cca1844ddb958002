import pytest
import torch

from ropesp.config import CacheConfig
from ropesp.errors import ConfigError
from ropesp.model.kv_cache import KVCache, SlotPlanner, attention


def test_rolling_indices_match_reference_example():
    # MODEL_SPEC 4.3 verified example: local=6 frames, sink=3, chunks of 3 (1 token per frame here)
    planner = SlotPlanner(CacheConfig(max_frames=99, local_attn_frames=6, sink_frames=3), frame_tokens=1)
    local_ends, global_ends, rolls = [], [], []
    for chunk in range(5):
        for _ in range(5):  # 4 denoising passes + the clean pass reuse the same slots
            slots = planner.plan(chunk * 3, 3)
            planner.commit(slots)
            assert (slots.write_start, slots.write_end) == (slots.local_end - 3, slots.local_end)
        local_ends.append(planner.local_end)
        global_ends.append(planner.global_end)
        rolls.append(slots.roll)
    assert local_ends == [3, 6, 6, 6, 6]
    assert global_ends == [3, 6, 9, 12, 15]


def test_roll_happens_once_per_chunk_and_keeps_the_sink():
    planner = SlotPlanner(CacheConfig(max_frames=99, local_attn_frames=5, sink_frames=1), frame_tokens=2)
    plans = []
    for chunk in range(4):
        first = planner.plan(chunk * 4, 4)
        planner.commit(first)
        again = planner.plan(chunk * 4, 4)
        planner.commit(again)
        assert again.roll is None
        plans.append(first)
    # size 10 slots, sink 2: chunk 2 needs 4 more than the 8 held -> evict 2, keep 4
    assert plans[2].roll == (4, 2, 4)
    assert (plans[2].write_start, plans[2].write_end) == (6, 10)
    assert plans[3].roll == (6, 2, 4)


def test_global_cache_overflow_is_refused():
    planner = SlotPlanner(CacheConfig(max_frames=6), frame_tokens=4)
    planner.commit(planner.plan(0, 12))
    planner.commit(planner.plan(12, 12))
    with pytest.raises(ConfigError, match="exceeds the KV cache of 6 frames"):
        planner.plan(24, 12)


def test_rolling_attention_equals_attention_over_the_window_tokens():
    """Stream 5 chunks through a rolling cache; each chunk's attention must equal attention over
    exactly the sink frames + the newest (window - sink) frames of the stream."""
    ft, chunk, window, sink = 3, 2, 5, 1
    cache = KVCache(
        1, 1, ft, CacheConfig(99, window, sink), local_heads=2, head_dim=8, dtype=torch.float64, device="cpu"
    )
    g = torch.Generator().manual_seed(0)
    all_k, all_v = [], []
    for c in range(5):
        n = chunk * ft
        q = torch.randn(1, n, 2, 8, generator=g, dtype=torch.float64)
        k = torch.randn(1, n, 2, 8, generator=g, dtype=torch.float64)
        v = torch.randn(1, n, 2, 8, generator=g, dtype=torch.float64)
        all_k.append(k)
        all_v.append(v)
        slots = cache.begin(c * n, n)
        kw, vw = cache.update(0, slots, k, v)
        out = attention(q, kw, vw)
        cache.commit(slots)
        stream_k, stream_v = torch.cat(all_k, 1), torch.cat(all_v, 1)
        total = stream_k.shape[1] // ft
        keep = (
            list(range(total))
            if total <= window
            else list(range(sink)) + list(range(total - (window - sink), total))
        )
        idx = torch.tensor([f * ft + i for f in keep for i in range(ft)])
        expected = attention(q, stream_k[:, idx], stream_v[:, idx])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_update_takes_token_blocks_as_flat_tokens():
    """k, v as [B, N1, N2, H, D] blocks (a head-sharded all-to-all's) land where the flat [B, N, H, D] do."""
    flat, blocks = (KVCache(2, 1, 6, CacheConfig(max_frames=4), 2, 4, torch.float32, "cpu") for _ in range(2))
    k, v = torch.randn(2, 1, 3, 4, 2, 4).unbind(0)  # [B, N1=3 blocks, N2=4 tokens, H, D]: 2 frames of 6
    a = flat.update(1, flat.begin(0, 12), k.flatten(1, 2), v.flatten(1, 2))
    b = blocks.update(1, blocks.begin(0, 12), k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(flat.k, blocks.k) and torch.equal(flat.v, blocks.v)
    assert torch.equal(b[0], k.flatten(1, 2)) and torch.equal(b[1], v.flatten(1, 2))
