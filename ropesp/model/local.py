"""Single-device chunk runner: all tokens on one rank, attention straight into the KV cache."""

from __future__ import annotations

import functools

import torch

from ropesp.model.kv_cache import CacheSlots, KVCache, attention
from ropesp.model.rope import RopeTables, rope_apply_ref, rotate_pairs


def make_rope(
    mode: str,
    start_frame: int | torch.Tensor,
    frames: int,
    rows: int,
    cols: int,
    first_token: int,
    tables: RopeTables | None,
    theta: float,
):
    """x [B, L, H, D] -> rotated x, for 'tables' (fp32 precomputed) or 'reference' (float64, full chunk)."""
    if mode == "tables":
        assert tables is not None
        cos_sin: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def rope(x: torch.Tensor) -> torch.Tensor:
            # q and k of every layer share positions: gather cos/sin once per forward
            n = x.shape[1]
            if n not in cos_sin:
                cos_sin[n] = tables.cos_sin(start_frame, first_token, n, frames, rows, cols)
            return rotate_pairs(x, *cos_sin[n])

        return rope
    if mode == "reference":
        assert first_token == 0, "the reference RoPE needs the full chunk"
        return functools.partial(
            rope_apply_ref, start_frame=int(start_frame), frames=frames, rows=rows, cols=cols, theta=theta
        )
    raise ValueError(f"unknown rope mode {mode!r}; expected 'tables' or 'reference'")


class LocalRunner:
    """ChunkRunner for one device: identity shard/gather, cache write + attention over the window."""

    first_token = 0

    def __init__(self, cache: KVCache, slots: CacheSlots, rope, attend=attention) -> None:
        """attend(q, k, v) -> out, all [B, L, H, D]: the attention kernel (default SDPA)."""
        self.cache = cache
        self.slots = slots
        self.rope = rope
        self.attend = attend

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_win, v_win = self.cache.update(layer, self.slots, k, v)  # [B, S_win, H, D]
        return self.attend(q, k_win, v_win)
