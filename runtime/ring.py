"""Hybrid sequence parallelism: Ulysses (heads) x ring (tokens) for any world size P = U x R.

Rank p = r*U + u sits in Ulysses group r (ranks r*U .. r*U+U-1: keep these inside one node). Tokens
are split contiguously over all P ranks as in pure Ulysses; the fused all-to-all inside a Ulysses
group turns this rank's L/P tokens x H heads into the group's segment of U*L/P tokens x H/U heads.
The KV cache is sharded by heads within a group and by tokens across the ring: each rank stores the
keys/values of its own segment of every chunk.

Attention of a segment's queries needs every ring peer's keys: the K/V shards travel around the
ring (R-1 point-to-point steps) and the partial results are merged by their log-sum-exp (online
softmax). Softmax attention does not depend on key order, so the rolling window is simply the same
token SET as on one rank — the stream's first `sink` tokens plus its newest `window - sink` tokens —
and on every rank that set is a prefix plus a suffix of its own storage (stored in stream order),
which `RingSlotPlanner` keeps by compacting exactly as the single-rank cache does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ropesp.config import CacheConfig
from ropesp.errors import ConfigError, arg
from ropesp.parallel import SPLayout, TokenShard

Ranges = list[tuple[int, int]]  # stored tokens as [start, end) stream positions, in storage order


def _count(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def _clip(ranges: Ranges, lo: int, hi: int) -> Ranges:
    return [(max(a, lo), min(b, hi)) for a, b in ranges if min(b, hi) > max(a, lo)]


class RingSlotPlanner:
    """Host-side storage plan of one ring shard (the same window semantics as SlotPlanner)."""

    def __init__(self, cache: CacheConfig, frame_tokens: int) -> None:
        self.cfg = cache
        self.size = cache.slot_frames * frame_tokens  # the single-rank window, in stream tokens
        self.sink = cache.sink_frames * frame_tokens
        self.stored: Ranges = []
        self.global_end = 0

    def reset(self) -> None:
        self.stored = []
        self.global_end = 0

    def plan(self, current_start: int, chunk_end: int, own: tuple[int, int]):
        """For a forward of the chunk [current_start, chunk_end) whose tokens `own` this shard stores:
        (roll (src, dst, n) or None, write_start, window_end, ranges after the forward)."""
        stored = self.stored
        if current_start > self.global_end:
            if not self.cfg.rolling:
                raise ConfigError(
                    f"chunk at token {current_start} skips past the cached stream end {self.global_end}"
                )
            stored = _clip(stored, 0, self.sink)  # a re-cache replay's skip: SlotPlanner.plan's rule
        own_ranges = [own] if own[1] > own[0] else []
        if current_start < self.global_end:  # a re-pass of the newest chunk overwrites its slots
            kept = _clip(stored, 0, current_start)
            n = _count(kept)
            return None, n, n + _count(own_ranges), kept + own_ranges
        roll = None
        kept = stored
        if chunk_end > self.size:
            if not self.cfg.rolling:
                raise ConfigError(
                    f"the stream passes {self.cfg.slot_frames} frames, the KV cache's size; raise "
                    f"{arg('max_frames')} or use a rolling window ({arg('local_attn_frames')}/{arg('sink_frames')})"
                )
            cutoff = max(chunk_end - (self.size - self.sink), self.sink)
            head = _clip(stored, 0, self.sink)
            tail = _clip(stored, cutoff, chunk_end)
            n_head, n_tail = _count(head), _count(tail)
            src = _count(stored) - n_tail
            roll = (src, n_head, n_tail) if src != n_head else None
            kept = head + tail
        n = _count(kept)
        return roll, n, n + _count(own_ranges), kept + own_ranges

    def commit(self, stored: Ranges, chunk_end: int) -> None:
        self.stored = stored
        self.global_end = max(self.global_end, chunk_end)


def ring_capacity(cache: CacheConfig, frame_tokens: int, chunk_frames: list[int], segment: int) -> int:
    """Tokens one ring shard may hold at most (every chunk the window touches, a full segment each)."""
    smallest = min(chunk_frames)
    if cache.rolling:
        chunks = math.ceil((cache.local_attn_frames - cache.sink_frames) / smallest) + 1
        chunks += math.ceil(cache.sink_frames / smallest) + 1 if cache.sink_frames else 0
    else:
        chunks = math.ceil(cache.max_frames / smallest)
    return min(chunks * segment, cache.slot_frames * frame_tokens)


class RingCache:
    """This rank's cache shard (its segment's tokens, its H/U heads) + every peer's plan."""

    def __init__(
        self,
        layout: SPLayout,
        rank: int,
        num_layers: int,
        batch: int,
        frame_tokens: int,
        cache: CacheConfig,
        capacity: int,
        local_heads: int,
        head_dim: int,
        dtype,
        device,
    ) -> None:
        self.layout = layout
        self.ring_index, self.u = layout.coords(rank)
        # every rank mirrors every ring peer's (host-side) plan to size the receive buffers
        self.planners = [RingSlotPlanner(cache, frame_tokens) for _ in range(layout.ring)]
        self.capacity = capacity
        shape = (num_layers, batch, capacity, local_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def reset(self) -> None:
        for p in self.planners:
            p.reset()

    def segment(self, ring_index: int, local_len: int, total: int) -> tuple[int, int]:
        """[start, end) of a Ulysses group's real (unpadded) tokens within the chunk."""
        start = ring_index * self.layout.ulysses * local_len
        return min(start, total), min(start + self.layout.ulysses * local_len, total)

    def begin(self, current_start: int, total: int) -> RingSlots:
        """Plan a forward of the chunk's `total` tokens from stream position current_start (host-side);
        rolls this shard's window if needed."""
        local_len = TokenShard.split(total, self.layout.world_size, 0).length  # L_local
        plans = []
        for r, planner in enumerate(self.planners):
            s0, s1 = self.segment(r, local_len, total)
            plans.append(
                planner.plan(current_start, current_start + total, (current_start + s0, current_start + s1))
            )
        roll, write_start, window_end, _ = plans[self.ring_index]
        if window_end > self.capacity:
            raise ConfigError(f"ring cache shard overflow: {window_end} tokens > capacity {self.capacity}")
        if roll is not None and roll[2] > 0:
            src, dst, n = roll
            self.k[:, :, dst : dst + n] = self.k[:, :, src : src + n].clone()
            self.v[:, :, dst : dst + n] = self.v[:, :, src : src + n].clone()
        return RingSlots(
            write_start, window_end, [p[2] for p in plans], [p[3] for p in plans], current_start + total
        )

    def commit(self, slots: RingSlots) -> None:
        for planner, stored in zip(self.planners, slots.stored):
            planner.commit(stored, slots.chunk_end)


@dataclass(frozen=True)
class RingSlots:
    write_start: int
    window_end: int
    """This shard's window is [0, window_end)."""
    peer_lengths: list[int]
    """Window length of every ring peer, by ring index."""
    stored: list[Ranges]
    chunk_end: int


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp. q: [B, Lq, H, D]; k, v: [B, Lk, H, D] ->
    out [B, Lq, H, D], lse [B, H, Lq] float32."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    elif q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:  # flash takes half precision only: fp32 on a GPU goes through the explicit softmax
        scores = (qt.float() @ kt.float().transpose(-1, -2)) * qt.shape[-1] ** -0.5  # [B, H, Lq, Lk]
        lse = torch.logsumexp(scores, dim=-1)
        out = (torch.exp(scores - lse.unsqueeze(-1)) @ vt.float()).to(q.dtype)
    return out.transpose(1, 2), lse.float()  # [B, Lq, H, D]


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of disjoint key sets: sum_i exp(lse_i - logsumexp(lse)) * out_i."""
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)  # [B, H, Lq]
    out = sum(o.float() * torch.exp(p_lse - lse).transpose(1, 2).unsqueeze(-1) for o, p_lse in parts)
    return out.to(parts[0][0].dtype)


def ulysses_group(layout: SPLayout, rank: int):
    """This rank's Ulysses subgroup; every rank creates every group, in the same order."""
    import torch.distributed as dist

    mine = None
    for r in range(layout.ring):
        ranks = [layout.rank_of(r, u) for u in range(layout.ulysses)]
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine
