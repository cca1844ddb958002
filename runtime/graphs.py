"""CUDA graphs of whole chunk forwards, shared by the eager/compile and the engine executors.

A chunk forward is host-sync free (tests/runtime/test_no_host_sync.py), and everything that varies
between calls of the same shape lives in device buffers: the latents and timestep sinusoid (copied
into the graph's static inputs), start_frame (a device scalar the RoPE op reads), the KV cache and the
cross-attention K/V (fixed addresses). What the host decides per call is the cache slot plan (which
cache rows are written and attended) and which stream slot's cache it is, so there is one graph per
distinct (slot, plan): with a fixed-size cache that is one per chunk position of the video (7 for 21
latent frames), captured during the slot's first video and replayed for every later one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch


class ChunkGraphs:
    """Captured chunk forwards keyed by slot plan: `run(key, fn, *inputs)` replays or captures."""

    def __init__(self, stream: torch.cuda.Stream | None = None) -> None:
        self.stream = stream
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        # one memory pool for every graph: replays never overlap (one stream, outputs cloned), so a
        # graph may reuse what another's dead intermediates used; separate pools would keep one chunk's
        # activation peak per chunk position
        self.pool = None

    def __len__(self) -> int:
        return len(self.graphs)

    def clear(self, which: Callable[[Hashable], bool] | None = None) -> None:
        """Drop the graphs whose key `which` selects (default: all)."""
        if which is None:
            self.graphs.clear()
            self.pool = None
            return
        for key in [k for k in self.graphs if which(k)]:
            del self.graphs[key]

    def run(self, key: Hashable, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs) through the graph of key: inputs are copied into its static buffers, the output
        is cloned (the static output is overwritten by the next replay)."""
        if key not in self.graphs:
            static = [t.clone() for t in inputs]
            # warm-up outside capture (lazy inits, compilation, cuDNN plans); it writes the same cache
            # rows with the same values the capture and every replay write
            fn(*static)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"
            ):
                out = fn(*static)
            self.pool = self.pool if self.pool is not None else graph.pool()
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for buf, t in zip(static, inputs, strict=True):
            buf.copy_(t)
        graph.replay()
        return out.clone()
