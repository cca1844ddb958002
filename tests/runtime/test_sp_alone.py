"""A rank alone (AloneCollectives handed in, `ropesp bench --alone`): rank 0's compute at world size P,
no peers."""

import pytest
import sp_worker
import torch
import torch.distributed as dist

import ropesp.model.kv_cache as kv_cache
from ropesp.errors import ConfigError
from ropesp.model.kv_cache import KVCache
from ropesp.runtime.dist import Mapping
from ropesp.runtime.pipeline import build_session
from ropesp.runtime.sp import AloneCollectives, CollectiveLog

LAYERS, HEADS, HEAD_DIM = 2, 12, 16  # tiny preset
FRAME_TOKENS = 5 * 7  # sp_worker's 10x14 latents, patch 2x2
CHUNK_TOKENS = 3 * FRAME_TOKENS


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_alone_rank_has_rank0s_shapes_and_call_pattern(world_size, prompt, monkeypatch):
    seen = []
    real_attention = kv_cache.attention

    def recording(q, k, v):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return real_attention(q, k, v)

    monkeypatch.setattr(kv_cache, "attention", recording)  # the default kernel (--attention sdpa)
    written = []
    real_update = KVCache.update

    def recording_update(self, layer, slots, k, v):
        written.append(tuple(k.shape))
        return real_update(self, layer, slots, k, v)

    monkeypatch.setattr(KVCache, "update", recording_update)
    cfg = sp_worker.base_config(world_size=world_size, **sp_worker.MODES["optimized"])
    log = CollectiveLog()
    session = build_session(cfg, Mapping(world_size, 0, 0), comm=AloneCollectives(world_size, log))
    assert not dist.is_initialized()  # no process group, no peers
    state = session.executor.state
    session.reset(prompt, seed=3)
    log.counts.clear()
    out = session.executor.forward(torch.zeros(1, 3, 16, 10, 14), torch.tensor(500.0), 0)
    # the same collectives per forward as a real rank's (test_sp: test_sp_equals_single_rank)
    assert dict(log.counts) == {"all_to_all": 2 * LAYERS, "all_gather": 1}
    # attention of the whole chunk over this rank's H/P heads, as a real rank of P
    assert seen == [((1, CHUNK_TOKENS, HEADS // world_size, HEAD_DIM),) * 2] * LAYERS
    assert state.cache.k.shape[-2] == HEADS // world_size
    # keys go into the cache as the exchange's [B, P, L_local, H/P, D] blocks where the chunk splits
    # evenly (105 tokens over 3 ranks), as flat tokens where it is padded (106 and 108 over 2 and 4)
    blocks = (1, world_size, CHUNK_TOKENS // world_size, HEADS // world_size, HEAD_DIM)
    flat = (1, CHUNK_TOKENS, HEADS // world_size, HEAD_DIM)
    assert written == [blocks if CHUNK_TOKENS % world_size == 0 else flat] * LAYERS
    assert out.shape == (1, 3, 16, 10, 14) and torch.isfinite(out).all()
    session.reset(seed=3)
    assert len(list(session)) == 2  # a whole video streams (on wrong data: the peers' parts are missing)


def test_alone_collectives_keep_shapes_and_move_nothing():
    log = CollectiveLog()
    comm = AloneCollectives(4, log)
    x = torch.arange(24.0).view(4, 2, 3)  # [P(dst), ...]
    assert torch.equal(comm.all_to_all(x), x)  # this rank's slices stand in for the peers'
    gathered = comm.all_gather(x[0])
    assert gathered.shape == (4, 2, 3) and all(torch.equal(g, x[0]) for g in gathered)
    assert dict(log.counts) == {"all_to_all": 1, "all_gather": 1}
    with pytest.raises(ConfigError, match="no ring peers"):
        comm.ring_shift_start(x, x, 1, 3)


def test_alone_refuses_the_ring_layout():
    cfg = sp_worker.base_config(world_size=4, ring_degree=2)
    with pytest.raises(ConfigError, match="pure Ulysses only"):
        build_session(cfg, Mapping(4, 0, 0), comm=AloneCollectives(4))


def test_collectives_of_another_world_size_are_refused():
    cfg = sp_worker.base_config(world_size=2)
    with pytest.raises(ConfigError, match="collectives of 3 ranks for a world of 2"):
        build_session(cfg, Mapping(2, 0, 0), comm=AloneCollectives(3))


def test_collectives_without_an_observer_count_nothing():
    """Product code passes no observer: the collectives keep no counters or timers of their own."""
    comm = AloneCollectives(2)
    comm.all_to_all(torch.zeros(2, 3))
    assert comm.observer is None and not hasattr(comm, "counts")


def test_collective_log_times_only_after_start_timing():
    log = CollectiveLog()
    comm = AloneCollectives(2, log)
    comm.all_gather(torch.zeros(3))
    assert log.elapsed_ms() == 0.0  # counted, not timed
    log.start_timing()
    comm.all_gather(torch.zeros(3))
    assert dict(log.counts) == {"all_gather": 2} and log.elapsed_ms() > 0.0


def test_alone_rank_of_three_writes_its_blocks_into_the_e4m3_cache(prompt, monkeypatch):
    """`--attention fp8` at P = 3 (a chunk that splits evenly): the exchange's [B, P, L_local, H/P, D]
    key blocks are quantized into the head-sharded e4m3 cache and calibrate it (the mode's hardware
    check is bypassed: fp8_attention runs its CPU reference)."""
    from ropesp.plugins import attention_8bit
    from ropesp.plugins.e4m3_cache import E4M3KVCache

    monkeypatch.setattr(attention_8bit, "attention_unsupported_reason", lambda *a, **k: None)
    cfg = sp_worker.base_config(world_size=3, attention="fp8", **sp_worker.MODES["optimized"])
    session = build_session(cfg, Mapping(3, 0, 0), comm=AloneCollectives(3, CollectiveLog()))
    cache = session.executor.state.cache
    assert isinstance(cache, E4M3KVCache) and cache.k.shape[-2] == HEADS // 3
    session.reset(prompt, seed=3)
    out = session.executor.forward(torch.zeros(1, 3, 16, 10, 14), torch.tensor(500.0), 0)
    assert torch.isfinite(out).all()
    written = cache.k[:, :, :CHUNK_TOKENS].float()
    assert written.abs().amax() > 100  # scaled to e4m3's range (448 / HEADROOM at the maximum)
    assert (cache.k_descale != 1).all() and (cache.k_offset != 0).any()
