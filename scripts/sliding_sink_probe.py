"""Probe: the demo model's long-stream score with the sink's RoPE position sliding along with the window.

    python scripts/sliding_sink_probe.py slide|plain [ropesp.demo.long_stream flags, e.g. --windows 9/3]

With `slide`, every roll of the rolling window rotates the cached sink keys forward in time by the frames
it evicts, so the sink stays adjacent to the oldest frame of the window (Rolling Sink's and StreamingLLM's
position re-assignment) instead of at stream frames 0..2: a chunk far into the stream sees the sink at the
distance a short video's chunk sees its first chunk. `plain` is the runtime as it is (the baseline of the
same run). Training-free, eager runtime only (model/kv_cache.py KVCache.begin wrapped).
"""

from __future__ import annotations

import sys

import torch

from ropesp.demo import long_stream
from ropesp.model import kv_cache
from ropesp.model.rope import axis_inv_freq, head_dim_split, rotate_pairs

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


def main() -> None:
    mode, argv = sys.argv[1], sys.argv[2:]
    if mode not in ("slide", "plain"):
        sys.exit("usage: sliding_sink_probe.py slide|plain [long_stream flags]")
    if mode == "slide":
        kv_cache.KVCache.begin = sliding_begin(kv_cache.KVCache.begin)
    long_stream.main(argv)


if __name__ == "__main__":
    main()
