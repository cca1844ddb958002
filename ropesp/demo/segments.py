"""Training samples cut from long streams under the runtime's rolling window, and the one-pass forward
that trains on them (ropesp.demo.train).

A stream of the runtime (runtime/session.py, model/kv_cache.py) with `--local-attn-frames W --sink-frames S`
and 3-frame chunks: chunk c attends to the sink (chunk 0's frames, kept for ever when S = 3), to the
newest `(W - S) / 3 - 1` earlier chunks (its window, `Layout.window`) and to itself, with RoPE at the
frames' stream positions. The demo page's 9/3 window: the sink, the previous chunk, the chunk; 6/0: the
previous chunk and the chunk; 12/3: the sink and the two previous chunks.

A sample holds a few chunks of such a stream (slots of 3 frames): optionally the sink chunk, context-only
("warm") chunks, then the supervised chunks. Every chunk is there as a clean copy (t = 0: the keys and
values the clean-context pass writes into the cache) and every supervised chunk also as a noisy copy (at
one of the sampler's timesteps: its denoising forwards). Each slot's queries attend, unmasked, to the
slots the runtime would have in the cache at that point:
    clean chunk c: clean chunks of its window, the sink, itself (its clean-context pass);
    noisy chunk c: clean chunks of its window, the sink, its own noisy copy (its denoising forwards).
A far sample (`far=True`) starts at a stream chunk well past the start, so the first warm chunks see less
than they did in the stream; their keys approximate the stream's, and only later chunks are supervised.
`segment_flow` runs the model over all slots in one pass: attention grouped by how many slots a query
sees (one unmasked SDPA per group), RoPE per sample at its own stream positions, and an optional prompt
switch (chunks from one slot on read another prompt's cross-attention, as `StreamSession.set_prompt`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ropesp.demo.adapter import StreamGates
from ropesp.model.rope import cos_sin_at
from ropesp.model.wan import CausalWanDiT, timestep_sinusoid


@dataclass(frozen=True)
class Layout:
    """Which chunks a sample holds and what each slot's queries attend to.

    Clean slots 0..clean-1 in stream order, then noisy slots clean..clean+noisy-1: the noisy copies of the
    last `noisy` clean slots."""

    clean: int
    noisy: int
    sees: tuple[tuple[int, ...], ...]
    """Per slot (clean, then noisy): the slots its queries attend to, ascending."""
    offsets: tuple[int, ...]
    """Per clean slot: its stream chunk relative to the first run chunk (the sink slot: its own value,
    `SINK`), see `chunk_numbers`."""
    window: int | None
    sink: bool

    @property
    def slots(self) -> int:
        return self.clean + self.noisy

    def chunk_numbers(self, first: torch.Tensor) -> torch.Tensor:
        """Stream chunk of every clean slot [B, clean] int64, for the run's first chunk `first` [B]."""
        rel = torch.tensor(self.offsets, device=first.device)
        return torch.where(rel == SINK, 0, first[:, None] + rel)


SINK = -(10**9)
"""`Layout.offsets` of the sink slot (stream chunk 0, whatever the run's first chunk)."""


def stream_layout(window: int | None, sink: bool, warm: int, supervised: int, far: bool) -> Layout:
    """The layout of a sample of `supervised` chunks after `warm` context-only ones, under a window of
    `window` earlier chunks (None: global attention) with or without the sink.

    far=False: the run starts at stream chunk 0 (then `warm` must be 0, and chunk 0 is the sink when
    `sink`); far=True: it starts later (`first` > window), with the sink as its own slot before it."""
    if not far and warm:
        raise ValueError("a run from the stream's start has no warm chunks")
    run = warm + supervised
    separate_sink = far and sink
    offsets = ((SINK,) if separate_sink else ()) + tuple(range(run))
    clean = len(offsets)
    base = clean - run  # slot of run chunk 0
    sink_slots = (0,) if sink else ()  # the separate sink slot, or run chunk 0 from the start

    def context(i: int) -> set[int]:
        lo = 0 if window is None else max(0, i - window)
        return {base + j for j in range(lo, i)} | set(sink_slots)

    sees = [tuple(sorted(context(i) | {base + i})) for i in range(run)]
    if separate_sink:
        sees.insert(0, (0,))
    noisy_sees = [tuple(sorted(context(i) - {base + i})) + (clean + i - warm,) for i in range(warm, run)]
    return Layout(clean, supervised, tuple(sees + noisy_sees), offsets, window, sink)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with per-sample tables: x [B, L, H, D], cos/sin [B, L, D/2] -> x's dtype, fp32 math (the
    adjacent-pair rotation of ropesp.model.rope.rotate_pairs)."""
    b, n, h, d = x.shape
    xf = x.float().reshape(b, n, h, d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(b, n, h, d).to(x.dtype)


def rope_tables(
    frame_times: torch.Tensor, rows: int, cols: int, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, F*rows*cols, D/2] float32 of tokens in (frame, row, col) order, frame f of sample b
    at stream frame frame_times[b, f]."""
    b, f = frame_times.shape
    ft = rows * cols
    g = torch.arange(ft, device=frame_times.device)
    time = frame_times[:, :, None].expand(b, f, ft).reshape(-1)
    row, col = (g // cols).repeat(b * f), (g % cols).repeat(b * f)
    valid = torch.ones_like(time, dtype=torch.bool)
    cos, sin = cos_sin_at(time, row, col, valid, head_dim, theta)
    return cos.view(b, f * ft, -1), sin.view(b, f * ft, -1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Each slot's queries over the keys of the slots it sees. q, k, v: [B, slots*T, H, D] -> [B, slots*T, H, D]."""
    b, n, h, d = q.shape
    t = n // layout.slots
    qs, ks, vs = (x.view(b, layout.slots, t, h, d) for x in (q, k, v))  # [B, slots, T, H, D]
    out = torch.empty_like(qs)
    for slots, seen in _uncached_when_compiling(_groups)(layout, q.device):
        g, m = seen.shape
        qg = qs[:, slots].reshape(b * g, t, h, d)
        kg = ks[:, seen].reshape(b * g, m * t, h, d)  # [B, G, m, T, H, D] -> [B*G, m*T, H, D]
        vg = vs[:, seen].reshape(b * g, m * t, h, d)
        o = F.scaled_dot_product_attention(
            qg.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2)
        )  # [B*G, H, T, D]
        out[:, slots] = o.transpose(1, 2).reshape(b, g, t, h, d)
    return out.view(b, n, h, d)


def _uncached_when_compiling(fn):
    """A functools.cache'd helper, or under torch.compile the function it wraps (Dynamo traces through
    the cache and warns; the graph holds the result as constants either way)."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


@functools.cache
def _groups(layout: Layout, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The slots grouped by how many slots they see: [(slots [G] int64, the slots each sees [G, m])]."""
    groups: dict[int, list[int]] = {}
    for slot, seen in enumerate(layout.sees):
        groups.setdefault(len(seen), []).append(slot)
    return [
        (torch.tensor(slots, device=device), torch.tensor([layout.sees[s] for s in slots], device=device))
        for slots in groups.values()
    ]


def segment_flow(
    model: CausalWanDiT,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    t_noisy: torch.Tensor,
    prompt_embeds: torch.Tensor,
    layout: Layout,
    chunks: torch.Tensor,
    switch: tuple[torch.Tensor, int] | None = None,
    gates: StreamGates | None = None,
) -> torch.Tensor:
    """Flow prediction [B, noisy*3, C, h, w] for the noisy slots, all of them in one pass.

    clean: [B, clean*3, C, h, w]; noisy: [B, noisy*3, C, h, w]; t_noisy: [B, noisy*3] timesteps;
    prompt_embeds: [B, Lt, text_dim]; chunks: [B, clean] stream chunk of every clean slot
    (`Layout.chunk_numbers`); switch: (prompt_embeds of another prompt, first clean slot that reads it):
    that slot, the later ones and their noisy copies take the other prompt's cross-attention; gates: the
    model's stream adapter in its training form (ropesp.demo.adapter), on for the slots at or past its
    first stream frame, as the runtime runs those chunks with the stream blocks."""
    b, f_clean, _, height, width = clean.shape
    cfg = model.cfg
    rows, cols = height // cfg.patch_size[1], width // cfg.patch_size[2]
    ft = rows * cols
    chunk = f_clean // layout.clean
    frames = f_clean + noisy.shape[1]
    tokens = model.patchify(torch.cat([clean, noisy], dim=1))  # [B, L, C]: clean slots, noisy slots
    t_all = torch.cat([torch.zeros(b, f_clean, device=t_noisy.device), t_noisy], dim=1)  # [B, F]
    e, e0 = model.embed_time(timestep_sinusoid(t_all.flatten(), cfg.freq_dim).view(b, frames, -1))
    frame_of_token = torch.arange(frames * ft, device=clean.device) // ft  # [L]
    slot_chunks = torch.cat([chunks, chunks[:, layout.clean - layout.noisy :]], dim=1)  # [B, slots]
    frame_times = (slot_chunks[:, :, None] * chunk + torch.arange(chunk, device=clean.device)).flatten(1)
    cos, sin = rope_tables(frame_times, rows, cols, cfg.dim // cfg.num_heads, cfg.rope_theta)

    def rope(x: torch.Tensor) -> torch.Tensor:
        return rotate(x, cos, sin)

    cross = model.cross_kv(prompt_embeds)
    parts = None
    if switch is not None:
        other, first = switch
        cross_b = model.cross_kv(other)
        parts, inverse = _uncached_when_compiling(_switch_parts)(layout, first, chunk * ft, clean.device)
    on = None if gates is None else gates.on_tokens(slot_chunks, chunk, chunk * ft)  # [B, L]
    for i, block in enumerate(model.blocks):
        if gates is not None:
            gates.set(on)
        q, k, v = block.pre_attention(tokens, e0, frame_of_token, rope)
        o = grouped_attention(q, k, v, layout)
        if parts is None:
            tokens = block.post_attention(tokens, o, e0, frame_of_token, *cross[i])
        else:
            outs = []
            for p, kv in zip(parts, (cross[i], cross_b[i]), strict=True):
                if gates is not None:
                    gates.set(on[:, p])
                outs.append(block.post_attention(tokens[:, p], o[:, p], e0, frame_of_token[p], *kv))
            tokens = torch.cat(outs, dim=1)[:, inverse]
    if gates is not None:
        gates.set(None)
    start = f_clean * ft
    out = model.head(tokens[:, start:], e[:, frame_of_token[start:]])
    return model.unpatchify(out.float(), noisy.shape[1], rows, cols)


@functools.cache
def _switch_parts(
    layout: Layout, first: int, slot_tokens: int, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """((tokens of the old prompt, tokens of the new one) [L_a], [L_b], the inverse of their
    concatenation [L]) for a switch at clean slot `first`: that slot, the later ones and their noisy
    copies read the new prompt."""
    slots = torch.arange(layout.slots)
    clean_slot = torch.where(slots < layout.clean, slots, slots - layout.noisy)  # noisy copy -> its chunk
    reads_b = (clean_slot >= first).repeat_interleave(slot_tokens)  # [L]
    parts = (torch.nonzero(~reads_b)[:, 0], torch.nonzero(reads_b)[:, 0])
    order = torch.cat(parts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return (parts[0].to(device), parts[1].to(device)), inverse.to(device)
