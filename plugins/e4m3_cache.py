"""The self-attention KV cache in e4m3 for `--attention fp8`: keys and values quantized once, when written.

    E4M3KVCache(...)                      KVCache's slots and shapes, k/v [num_layers, B, S, H, D] e4m3
    update(layer, slots, k, v) -> (E4M3, E4M3)   the attention window's keys and values with descales

FlashAttention-3's e4m3 forward takes one descale per (batch, head) for all the keys it attends to (and
one for the values), so every key of a stream must share its head's scale. The cache fixes, per (layer,
batch, head), for the whole stream:
  - the keys' offset: their mean over the first chunk's keys (per channel), taken out of every key
    before rounding; softmax is unchanged (q.(k - m) moves all of a query's scores by the same q.m),
    and the offset the keys share no longer takes e4m3's range (plugins/attention_8bit.py smooth_keys);
  - the values' offset, the same for the values (with smooth_values): fp8_attention adds it back to
    the output (softmax's weights sum to 1), so the kernel's P.v accumulates values of zero mean. In
    FlashAttention-3's e4m3 P.v, whose FP8 MMA accumulator keeps fewer bits than fp32, a shared offset
    grows the accumulator with every key, and the truncations with it: the kernel's error grew with
    the window, 0.071 -> 0.340 rel L2 from 4680 to 32760 keys on an H100, and is 0.0017-0.0018 at
    every length with the offset out (plugins/attention_8bit.py KEYS_PER_SPLIT); Wan-1.3B's 480p latents
    went from 0.046 -> 0.181 rel L2 per chunk against bf16 to 0.039 -> 0.071 (bench/notes-40.md);
  - the scales: the first chunk's absolute maximum (of the offset keys, of the values) maps to
    448 / HEADROOM; a later value beyond 448 saturates instead of turning into NaN.
They are set by every forward that writes from slot 0 (the first chunk's denoising passes and its
clean pass, whose window holds only their own tokens; a replay from the stream's start after `reset`)
and kept by every later write, so keys and values cost one elementwise pass per write and no call
reduces over the window (over a bf16 cache each fp8 call quantized its whole window: 0.18-0.79 ms per
layer on an H200, more than the e4m3 kernel saved). The queries are quantized per call by their amax
(plugins/attention_8bit.py): scales fixed by the first chunk as the keys' are cost the demo model
0.03 of its score on an H200 (0.891 against 0.903 per call, against 0.920 in fp32; bench/RESULTS.md).
The cache takes half the memory of a bf16 one.
"""

from __future__ import annotations

import torch

from ropesp.model.kv_cache import CacheSlots, KVCache
from ropesp.plugins.e4m3 import E4M3, E4M3_MAX, compiled, incoherent_rotation, rotated

HEADROOM = 4.0
"""The first chunk's absolute maximum lands on 448 / HEADROOM: later chunks may reach four times it
before saturating. e4m3 is floating point, so this costs no relative precision except for values below
2^-6 * HEADROOM / 448 (~1/1800) of the first chunk's maximum, which become subnormal. On the demo model
(fp32 on the CPU, 4 seeds x 15 latent frames, final latents against `--attention sdpa`): rel L2 0.0032 with
headroom 1 (later chunks saturate), 0.0007 with 2, 0.0006 with 4 and 8."""


def calibrate(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """k, v [B, *tokens, H, D] (tokens: N, or the all-to-all's U x N blocks) -> (key offset [B, H, D],
    key scale [B, H], value offset [B, H, D], value scale [B, H]) in fp32, offset = the mean over the
    tokens, scale = 448 / (HEADROOM * amax of the offset tensor)."""
    tokens = tuple(range(1, k.dim() - 2))
    kf, vf = k.float(), v.float()
    k_offset, v_offset = kf.mean(dim=tokens), vf.mean(dim=tokens)  # [B, H, D]
    k_centred = kf - k_offset.view(_broadcast(k, k_offset.shape[-1]))
    v_centred = vf - v_offset.view(_broadcast(v, v_offset.shape[-1]))
    return k_offset, _scale(k_centred, tokens), v_offset, _scale(v_centred, tokens)


def _scale(x: torch.Tensor, tokens: tuple[int, ...]) -> torch.Tensor:
    amax = x.abs().amax(dim=-1).amax(dim=tokens).clamp_min(1e-12)  # [B, H]
    return E4M3_MAX / (HEADROOM * amax)


def _broadcast(x: torch.Tensor, last: int) -> tuple[int, ...]:
    """The view of a [B, H, last] tensor that broadcasts against x [B, *tokens, H, D]."""
    return (x.shape[0], *([1] * (x.dim() - 3)), x.shape[-2], last)


def to_e4m3(x: torch.Tensor, offset: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """x [B, *tokens, H, D] -> float8_e4m3fn of (x - offset) * scale, saturated at +-448; offset
    [B, H, D] or None, scale [B, H]."""
    xf = x.float()
    if offset is not None:
        xf = xf - offset.view(_broadcast(x, offset.shape[-1]))
    xf = xf * scale.view(_broadcast(x, 1))
    return xf.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


class E4M3KVCache(KVCache):
    """KVCache with keys (after RoPE, less the stream's offset) and values (less theirs, with
    smooth_values) in float8_e4m3fn, and per (layer, batch, head) the stream's offsets [B, H, D] and
    descales [B, H] (fp32)."""

    storage_dtype = torch.float8_e4m3fn
    smooth_values = False
    """Take the values' offset out before rounding (and fp8_attention adds it back). Off: on Wan-1.3B it
    flattens the latents' drift like the pieces of KEYS_PER_SPLIT do (0.039-0.045 per chunk with both,
    0.046-0.058 with the pieces alone, 480p), but the demo model's score fell from 0.896 to 0.868 with it
    (fp32 0.920, H100; bench/RESULTS.md)."""

    rotate_keys = False
    """Store the keys rotated by plugins/e4m3.py incoherent_rotation (and fp8_attention rotates q alike):
    the scores are unchanged, e4m3 rounds the rotated channels. Off: on the demo model (fp32 CPU emulation
    of FlashAttention-3's roundings, scripts/fp8_attention_emulation.py /rot) it takes 19-41 % off the
    latents' error against exact attention, but it changes nothing on Wan-1.3B's random weights, is
    neutral on Gaussian inputs and hurts queries with a few large channels. Through FlashAttention-3 on an
    H100 (bench/RESULTS.md, eighteenth session) it gains nothing and costs: Wan-1.3B 480p drift per chunk
    0.046-0.058 with or without it, 0.90x the speed (51.5 against 57.0 FPS), the demo model's score 0.885
    against 0.896 (0.929 against 0.938 with the retrained weights)."""

    def __init__(self, *args, **kwargs) -> None:
        """KVCache's arguments; its dtype is the activations' (the keys and values handed to update)."""
        super().__init__(*args, **kwargs)
        layers, batch, _, heads, head_dim = self.k.shape
        device = self.k.device
        self.rotation = incoherent_rotation(head_dim, device) if self.rotate_keys else None
        """[D, D] fp32 the keys are stored under (None: as they are)."""
        self.k_offset, self.v_offset = (
            torch.zeros((layers, batch, heads, head_dim), dtype=torch.float32, device=device)
            for _ in range(2)
        )
        self.k_scale, self.v_scale, self.k_descale, self.v_descale = (
            torch.ones((layers, batch, heads), dtype=torch.float32, device=device) for _ in range(4)
        )

    def update(self, layer: int, slots: CacheSlots, k: torch.Tensor, v: torch.Tensor) -> tuple[E4M3, E4M3]:
        """Quantize k, v [B, N, H, D] (or [B, N1, N2, H, D] blocks, as KVCache.update) into the chunk's
        slots; a write from slot 0 first sets the stream's offsets and scales (in place: CUDA graphs
        read these buffers). Returns the window's keys and values, E4M3 [B, S_win, H, D]."""
        if self.rotation is not None:
            k = compiled(rotated, k)(k, self.rotation)
        if slots.write_start == 0:  # the window holds this write only: nothing quantized earlier
            k_offset, k_scale, v_offset, v_scale = compiled(calibrate, k)(k, v)
            self.k_offset[layer].copy_(k_offset)
            if self.smooth_values:
                self.v_offset[layer].copy_(v_offset)
            else:
                v_scale = compiled(_unsmoothed_scale, v)(v)
            for scale, descale, new in (
                (self.k_scale, self.k_descale, k_scale),
                (self.v_scale, self.v_descale, v_scale),
            ):
                scale[layer].copy_(new)
                descale[layer].copy_(new.reciprocal())
        quantize = compiled(to_e4m3, k)
        for buf, new, offset, scale in (
            (self.k, k, self.k_offset[layer], self.k_scale[layer]),
            (self.v, v, self.v_offset[layer] if self.smooth_values else None, self.v_scale[layer]),
        ):
            self.written_slots(buf, layer, slots, new).copy_(quantize(new, offset, scale))
        keys, values = self.window(layer, slots)
        v_offset = self.v_offset[layer] if self.smooth_values else None
        return (
            E4M3(keys, self.k_descale[layer], rotation=self.rotation),
            E4M3(values, self.v_descale[layer], v_offset),
        )


def _unsmoothed_scale(v: torch.Tensor) -> torch.Tensor:
    """The values' scale [B, H] without their offset taken out."""
    return _scale(v.float(), tuple(range(1, v.dim() - 2)))
