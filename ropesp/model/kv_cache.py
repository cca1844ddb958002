"""Persistent self-attention KV cache and its slot arithmetic (docs/MODEL.md section 4).

The buffers are allocated once per session and written in place. The slot arithmetic is pure
host-side integer math (no device sync): given the chunk's absolute token offset it says where the
chunk's keys go, which window the queries attend to, and whether the rolling window must first
shift its non-sink part down (evicting the oldest frames).

Calling `plan` again with the same `current_start` (the denoising passes and the clean-context pass
of one chunk) yields the same slots, so the clean pass overwrites the chunk's keys last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ropesp.config import CacheConfig
from ropesp.errors import ConfigError, arg


@dataclass(frozen=True)
class CacheSlots:
    """Where one forward reads and writes, in buffer slots (tokens)."""

    write_start: int
    write_end: int
    attn_start: int
    attn_end: int
    roll: tuple[int, int, int] | None
    """(source, destination, length): shift [src, src+len) down to [dst, dst+len) before writing."""
    global_end: int
    """Absolute stream position of the end of this write (after commit)."""
    local_end: int
    """Buffer position of the end of this write (after commit)."""


class SlotPlanner:
    """Host-side state of the cache indices: global_end / local_end as in the reference."""

    def __init__(self, cache: CacheConfig, frame_tokens: int) -> None:
        self.cfg = cache
        self.frame_tokens = frame_tokens
        self.size = cache.slot_frames * frame_tokens
        self.sink_tokens = cache.sink_frames * frame_tokens
        self.global_end = 0
        self.local_end = 0

    def reset(self) -> None:
        self.global_end = 0
        self.local_end = 0

    def plan(self, current_start: int, num_new: int) -> CacheSlots:
        """Slots for a forward of num_new tokens starting at absolute token current_start."""
        current_end = current_start + num_new
        global_end, local_end = self.global_end, self.local_end
        if current_start > global_end:
            if not self.cfg.rolling:
                raise ConfigError(
                    f"chunk at token {current_start} skips past the cached stream end {global_end}"
                )
            # a re-cache replay (runtime/session.py) skips the frames that left the window: before the
            # skipped span only the sink stays, so the cache again holds the sink + contiguous newest frames
            global_end, local_end = current_start, min(local_end, self.sink_tokens)
        roll = None
        new_tokens = current_end - global_end
        if self.cfg.rolling and current_end > global_end and local_end + num_new > self.size:
            evict = local_end + num_new - self.size
            keep = local_end - evict - self.sink_tokens
            if keep < 0:
                raise ConfigError(
                    f"a chunk of {num_new // self.frame_tokens} frames does not fit the rolling window of "
                    f"{self.cfg.local_attn_frames} frames with {self.cfg.sink_frames} sink frames; "
                    f"{arg('local_attn_frames')} must be >= sink frames + chunk frames"
                )
            roll = (self.sink_tokens + evict, self.sink_tokens, keep)
            local_end = local_end + new_tokens - evict
        else:
            local_end = local_end + new_tokens
        if local_end > self.size:
            frames = current_end // self.frame_tokens
            raise ConfigError(
                f"frame {frames} exceeds the KV cache of {self.cfg.slot_frames} frames; raise "
                f"{arg('max_frames')} or use a rolling window ({arg('local_attn_frames')}/{arg('sink_frames')})"
            )
        return CacheSlots(
            write_start=local_end - num_new,
            write_end=local_end,
            attn_start=max(0, local_end - self.size),
            attn_end=local_end,
            roll=roll,
            global_end=max(global_end, current_end),
            local_end=local_end,
        )

    def commit(self, slots: CacheSlots) -> None:
        self.global_end = slots.global_end
        self.local_end = slots.local_end


class KVCache:
    """Keys (after RoPE) and values of every cached token: k, v [num_layers, B, S, H_local, D]."""

    storage_dtype: torch.dtype | None = None
    """The buffers' dtype where it is not the activations' (plugins/e4m3_cache.py)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        frame_tokens: int,
        cache: CacheConfig,
        local_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.planner = SlotPlanner(cache, frame_tokens)
        shape = (num_layers, batch, self.planner.size, local_heads, head_dim)
        storage = self.storage_dtype or dtype
        self.k = torch.zeros(shape, dtype=storage, device=device)
        self.v = torch.zeros(shape, dtype=storage, device=device)

    @property
    def slots(self) -> int:
        return self.planner.size

    def reset(self) -> None:
        """Start a new stream; buffers are reused, not cleared (every read slot is written first)."""
        self.planner.reset()

    def begin(self, current_start: int, num_new: int) -> CacheSlots:
        """Plan a forward and perform the rolling shift (all layers at once) if it needs one."""
        slots = self.planner.plan(current_start, num_new)
        if slots.roll is not None:
            src, dst, n = slots.roll
            if n > 0:
                # overlapping ranges: copy through a clone, as the reference does
                self.k[:, :, dst : dst + n] = self.k[:, :, src : src + n].clone()
                self.v[:, :, dst : dst + n] = self.v[:, :, src : src + n].clone()
        return slots

    def commit(self, slots: CacheSlots) -> None:
        self.planner.commit(slots)

    def update(
        self, layer: int, slots: CacheSlots, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, N, H_local, D] into the chunk's slots; return the attention window views.

        k, v may also come as [B, N1, N2, H_local, D] with N = N1 * N2 in token order (the blocks of a
        head-sharded all-to-all, runtime/runners.py): written as they are, without flattening them first."""
        for buf, new in ((self.k, k), (self.v, v)):
            self.written_slots(buf, layer, slots, new).copy_(new)
        return self.window(layer, slots)

    @staticmethod
    def written_slots(buf: torch.Tensor, layer: int, slots: CacheSlots, new: torch.Tensor) -> torch.Tensor:
        """The view of buf (self.k or self.v) that the write of new (as update takes it) fills, in new's
        shape."""
        dst = buf[layer, :, slots.write_start : slots.write_end]
        return dst.unflatten(1, new.shape[1:3]) if new.dim() == 5 else dst

    def window(self, layer: int, slots: CacheSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys' and values' views [B, S_win, H_local, D] that this forward attends to."""
        window = slice(slots.attn_start, slots.attn_end)
        return self.k[layer, :, window], self.v[layer, :, window]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention. q: [B, Lq, H, D]; k, v: [B, Lk, H, D] -> [B, Lq, H, D]."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),  # [B, H, L, D]
    )
    return out.transpose(1, 2)  # [B, Lq, H, D]
