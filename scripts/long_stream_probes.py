"""Training-free probes of the demo model's long-stream score: where the sink sits in time, and RoPE per head.

    python scripts/long_stream_probes.py plain|slide|jitter=SIGMA [ropesp.demo.long_stream flags, e.g. --windows 9/3]

`plain` is the runtime as it is (the baseline of the same run). With `slide`, every roll of the rolling window rotates the cached sink keys forward in time by the frames
it evicts, so the sink stays adjacent to the oldest frame of the window (Rolling Sink's and StreamingLLM's
position re-assignment) instead of at stream frames 0..2: a chunk far into the stream sees the sink at the
distance a short video's chunk sees its first chunk. `plain` is the runtime as it is (the baseline of the
same run). With `jitter=SIGMA`, head h of H rotates time by base theta * (1 + e_h), e_h evenly spread over
[-SIGMA, SIGMA] (LoL's multi-head RoPE jitter, arXiv 2601.16914: heads whose slow temporal channels no longer
line up at the same distances), rows and columns as before. Eager runtime only (model/kv_cache.py
KVCache.begin and plugins/rope_sp.py rope_for_rank replaced).
"""

from __future__ import annotations

import sys

import torch

from ropesp.demo import long_stream
from ropesp.model import kv_cache
from ropesp.model.rope import axis_inv_freq, head_dim_split, rotate_pairs, token_positions
from ropesp.plugins import rope_sp

THETA = 10000.0  # the demo preset's rope_theta


def sliding_begin(begin):
    def wrapped(self: kv_cache.KVCache, current_start: int, num_new: int) -> kv_cache.CacheSlots:
        slots = begin(self, current_start, num_new)
        sink = self.planner.sink_tokens
        if slots.roll is not None and sink:
            src, dst, _ = slots.roll
            frames = (src - dst) // self.planner.frame_tokens  # evicted frames
            layers, b, _, h, d = self.k.shape
            t_dim = head_dim_split(d)[0]
            angles = torch.zeros(d // 2, dtype=torch.float64)
            angles[: t_dim // 2] = frames * axis_inv_freq(t_dim, THETA)  # time channels only
            cos = angles.cos().float().expand(sink, -1).to(self.k.device)
            sin = angles.sin().float().expand(sink, -1).to(self.k.device)
            keys = self.k[:, :, :sink].reshape(layers * b, sink, h, d)
            self.k[:, :, :sink] = rotate_pairs(keys, cos, sin).view(layers, b, sink, h, d)
        return slots

    return wrapped


def jittered_rope(sigma: float):
    """rope_sp.rope_for_rank with the time channels of head h rotated by base theta * (1 + e_h)."""

    def rope_for_rank(grid, start_frame, *, op: bool = True):
        if isinstance(start_frame, int):
            start_frame = torch.tensor([start_frame], dtype=torch.int32)
        tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

        def rope(x: torch.Tensor) -> torch.Tensor:
            b, n, h, d = x.shape
            key = (n, h, d, int(start_frame.reshape(()).item()))
            if key not in tables:
                g = grid
                time, row, col, valid = token_positions(
                    start_frame, g.first_token, n, g.frames, g.rows, g.cols, x.device
                )
                t_dim, r_dim, c_dim = head_dim_split(d)
                e = torch.linspace(-sigma, sigma, h, dtype=torch.float64)
                j = torch.arange(0, t_dim, 2, dtype=torch.float64) / t_dim
                inv_t = (g.theta * (1 + e))[:, None] ** (-j[None, :])  # [H, t/2]
                per_head = [
                    time.double()[:, None, None] * inv_t[None],  # [L, H, t/2]
                    (row.double()[:, None] * axis_inv_freq(r_dim, g.theta))[:, None].expand(-1, h, -1),
                    (col.double()[:, None] * axis_inv_freq(c_dim, g.theta))[:, None].expand(-1, h, -1),
                ]
                angles, v = torch.cat(per_head, dim=-1), valid[:, None, None]
                tables[key] = (
                    torch.where(v, angles.cos().float(), 1.0),
                    torch.where(v, angles.sin().float(), 0.0),
                )
            cos, sin = tables[key]  # [L, H, D/2]
            xf = x.float().reshape(b, n, h, d // 2, 2)
            x0, x1 = xf[..., 0], xf[..., 1]
            return (
                torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
                .reshape(b, n, h, d)
                .to(x.dtype)
            )

        return rope

    return rope_for_rank


def main() -> None:
    usage = "usage: long_stream_probes.py plain|slide|jitter=SIGMA [long_stream flags]"
    if len(sys.argv) < 2:
        sys.exit(usage)
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode == "slide":
        kv_cache.KVCache.begin = sliding_begin(kv_cache.KVCache.begin)
    elif mode.startswith("jitter="):
        rope_sp.rope_for_rank = jittered_rope(float(mode.removeprefix("jitter=")))
    elif mode != "plain":
        sys.exit(usage)
    long_stream.main(argv)


if __name__ == "__main__":
    main()
