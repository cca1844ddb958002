"""The e4m3 KV cache of `--attention fp8` (plugins/e4m3_cache.py) and fp8_attention's CPU reference:
the stream's offset and scales are set by the writes from slot 0 and kept by later ones, the windows
dequantize within e4m3's rounding, nothing turns into NaN, and a whole video through the runner stays
within e4m3's error of the bf16-cache path. FlashAttention-3 itself needs an sm_90 GPU
(tests/demo/test_gpu.py scores it there)."""

from __future__ import annotations

import pytest
import torch

from ropesp.config import CacheConfig
from ropesp.model.kv_cache import KVCache, attention
from ropesp.plugins import attention_8bit as a8
from ropesp.plugins import e4m3
from ropesp.plugins.e4m3_cache import HEADROOM, E4M3KVCache
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.settings import RunConfig

FT, HEADS, DIM = 4, 2, 8
"""Tokens per latent frame, heads, head dim of the small caches below."""


def _cache(frames: int = 6, **cache) -> E4M3KVCache:
    return E4M3KVCache(2, 1, FT, CacheConfig(frames, **cache), HEADS, DIM, torch.float32, "cpu")


def _kv(frames: int, seed: int, offset: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a large offset shared by a head's keys (as qk-normed DiT keys carry), and values."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, frames * FT, HEADS, DIM, generator=g)
    k = k + offset * torch.randn(1, 1, HEADS, DIM, generator=torch.Generator().manual_seed(99))
    return k, torch.randn(1, frames * FT, HEADS, DIM, generator=g)


def _write(cache: E4M3KVCache, layer: int, start_frame: int, k, v):
    """k, v [B, N, H, D] or [B, N1, N2, H, D] blocks of N1 * N2 tokens."""
    slots = cache.begin(start_frame * FT, k[0, ..., 0, 0].numel())
    out = cache.update(layer, slots, k, v)
    cache.commit(slots)
    return out


def _within_e4m3(back: torch.Tensor, exact: torch.Tensor, descale: torch.Tensor) -> bool:
    """Rounding to nearest with 3 mantissa bits errs by <= 2^-4 of |x| in the normal range, by half a
    subnormal step (2^-10 of the scale) below it."""
    tiny = 2.0**-10 * descale[:, None, :, None]
    return bool(((back - exact).abs() <= exact.abs() * 2**-4 + tiny + 1e-7).all())


@pytest.fixture
def values_offset_out(monkeypatch):
    """The cache with the values' offset taken out (E4M3KVCache.smooth_values, off by default)."""
    monkeypatch.setattr(E4M3KVCache, "smooth_values", True)


@pytest.mark.parametrize("smooth", [True, False])
def test_the_values_offset_is_taken_out_only_when_asked(monkeypatch, smooth):
    monkeypatch.setattr(E4M3KVCache, "smooth_values", smooth)
    k, v = _kv(3, 0)
    _, values = _write(_cache(), 0, 0, k, v)
    assert (values.offset is not None) == smooth
    off = values.offset[:, None] if smooth else torch.zeros(())
    assert _within_e4m3(values.dequantized() - off, v - off, values.descale)  # dequantized() adds it back


def test_the_default_keeps_the_values_as_they_are():
    assert E4M3KVCache.smooth_values is False


def test_buffers_are_e4m3_and_half_a_bf16_cache():
    cache = _cache()
    assert cache.k.dtype == cache.v.dtype == torch.float8_e4m3fn
    bf16 = KVCache(2, 1, FT, CacheConfig(6), HEADS, DIM, torch.bfloat16, "cpu")
    assert cache.k.nbytes * 2 == bf16.k.nbytes


def test_the_runs_memory_check_counts_the_e4m3_cache(monkeypatch):
    """RunConfig.resolve sizes the cache in its storage dtype: one byte per element for the fp8
    mode (its hardware check comes after the memory check and refuses the CPU), the model dtype's for
    the others."""
    import ropesp.limits as limits
    from ropesp.errors import ConfigError

    seen = []
    monkeypatch.setattr(limits, "check_cache_fits", lambda *args: seen.append(args[3]))
    resolve(RunConfig.of(preset="tiny", device="cpu", dtype="bfloat16"))
    with pytest.raises(ConfigError, match="--attention fp8"):
        resolve(RunConfig.of(preset="tiny", device="cpu", dtype="bfloat16", attention="fp8"))
    assert seen == [2, 1]


def test_the_first_chunk_sets_the_streams_offset_and_scales(values_offset_out):
    cache = _cache()
    k, v = _kv(3, seed=0)
    keys, values = _write(cache, 0, 0, k, v)
    offset = k.mean(dim=1)  # [B, H, D]
    torch.testing.assert_close(cache.k_offset[0], offset)
    amax_k = (k - offset[:, None]).abs().amax(dim=(1, 3))
    torch.testing.assert_close(cache.k_descale[0], amax_k * HEADROOM / e4m3.E4M3_MAX)
    v_offset = v.mean(dim=1)
    torch.testing.assert_close(cache.v_offset[0], v_offset)
    amax_v = (v - v_offset[:, None]).abs().amax(dim=(1, 3))
    torch.testing.assert_close(cache.v_descale[0], amax_v * HEADROOM / e4m3.E4M3_MAX)
    assert keys.data.shape == values.data.shape == (1, 3 * FT, HEADS, DIM)
    assert keys.offset is None and torch.equal(values.offset, cache.v_offset[0])  # only v's comes back
    assert _within_e4m3(keys.dequantized(), k - offset[:, None], keys.descale)
    assert _within_e4m3(values.dequantized() - v_offset[:, None], v - v_offset[:, None], values.descale)
    # layer 1 is not written yet: its scales are still the buffers' initial ones
    assert torch.equal(cache.k_descale[1], torch.ones(1, HEADS))


def test_later_chunks_keep_the_scales_and_saturate_instead_of_nan(values_offset_out):
    cache = _cache()
    k0, v0 = _kv(3, seed=0)
    _write(cache, 0, 0, k0, v0)
    scales = (
        cache.k_offset.clone(),
        cache.k_descale.clone(),
        cache.v_offset.clone(),
        cache.v_descale.clone(),
    )
    k1, v1 = _kv(3, seed=1)
    v1[0, 5, 1, 2] = 1e6  # far beyond HEADROOM x the first chunk's maximum
    keys, values = _write(cache, 0, 3, k1, v1)
    now = (cache.k_offset, cache.k_descale, cache.v_offset, cache.v_descale)
    assert all(torch.equal(a, b) for a, b in zip(scales, now))
    assert keys.data.shape[1] == 6 * FT  # the window: both chunks
    back = values.dequantized()
    assert torch.isfinite(back).all()
    saturated = e4m3.E4M3_MAX * values.descale[0, 1] + values.offset[0, 1, 2]
    assert back[0, 3 * FT + 5, 1, 2] == pytest.approx(saturated.item())
    # the first chunk's slots were not rewritten by the second write
    assert _within_e4m3(keys.dequantized()[:, : 3 * FT], k0 - cache.k_offset[0][:, None], keys.descale)


def test_every_write_from_slot_zero_recalibrates_and_reset_starts_over(values_offset_out):
    cache = _cache()
    k, v = _kv(3, seed=0)
    _write(cache, 0, 0, k, v)
    cache.reset()  # a new stream, or the first chunk's next denoising pass at the same slots
    _write(cache, 0, 0, 3 * k, 3 * v)
    amax_v = (v - v.mean(dim=1, keepdim=True)).abs().amax(dim=(1, 3))
    torch.testing.assert_close(cache.v_descale[0], 3 * amax_v * HEADROOM / e4m3.E4M3_MAX)
    torch.testing.assert_close(cache.k_offset[0], 3 * k.mean(dim=1))
    torch.testing.assert_close(cache.v_offset[0], 3 * v.mean(dim=1))


def test_blocks_of_the_all_to_all_write_as_their_flat_tokens():
    """k, v as [B, U, L_local, H, D] blocks (runtime/runners.py, Ulysses without padding) quantize and
    calibrate as the same tokens flattened."""
    flat, blocks = _cache(), _cache()
    k, v = _kv(3, seed=4)
    a = _write(flat, 0, 0, k, v)
    b = _write(blocks, 0, 0, k.unflatten(1, (2, 6)), v.unflatten(1, (2, 6)))
    torch.testing.assert_close(blocks.k_offset, flat.k_offset)
    for x, y in zip(a, b):
        assert torch.equal(x.data.float(), y.data.float()) and torch.equal(x.descale, y.descale)


def test_the_rolling_window_moves_e4m3_keys_with_their_scales():
    cache = _cache(frames=6, local_attn_frames=6, sink_frames=3)
    chunks = [_kv(3, seed=s) for s in range(3)]
    for i, (k, v) in enumerate(chunks):
        keys, values = _write(cache, 0, 3 * i, k, v)
    # sink (chunk 0) + newest chunk (2): chunk 1 was evicted by the roll
    offset = cache.k_offset[0][:, None]
    assert _within_e4m3(keys.dequantized()[:, : 3 * FT], chunks[0][0] - offset, keys.descale)
    assert _within_e4m3(keys.dequantized()[:, 3 * FT :], chunks[2][0] - offset, keys.descale)
    v_offset = cache.v_offset[0][:, None]
    assert _within_e4m3(values.dequantized()[:, 3 * FT :] - v_offset, chunks[2][1] - v_offset, values.descale)


def test_fp8_attention_over_the_first_chunk_is_the_per_call_e4m3_rounding(values_offset_out):
    """Over the first chunk's window the cache rounds exactly as quantizing smoothed keys per call
    would (HEADROOM is a power of two: the same mantissas), q rounded per call; the output is
    attention to e4m3's precision (measured rel L2 0.028-0.048 over seeds 0-4 with exact fp32
    attention; a doubled key descale gives 0.50-0.83)."""
    cache = _cache()
    k, v = _kv(3, seed=1)
    q = torch.randn(1, 3 * FT, HEADS, DIM, generator=torch.Generator().manual_seed(7))
    keys, values = _write(cache, 0, 0, k, v)
    out = a8.fp8_attention(q, keys, values)
    assert out.dtype == q.dtype

    def rounded(x):
        return e4m3.E4M3(*e4m3.quantize_per_head(x)).dequantized()

    v_mean = v.mean(dim=1, keepdim=True)
    per_call = attention(rounded(q), rounded(e4m3.smooth_keys(k)), rounded(v - v_mean) + v_mean)
    torch.testing.assert_close(out, per_call, rtol=1e-5, atol=1e-6)
    exact = attention(q, k, v)
    assert (out - exact).norm() / exact.norm() < 0.08


def test_the_fp8_mode_holds_the_e4m3_cache_and_a_video_stays_close(monkeypatch):
    """The runner's cache and attention for `attention="fp8"`, through a whole tiny video on the CPU
    (the mode's checks refuse the CPU for its kernel, so they are bypassed here; fp8_attention runs its
    reference). Against the bf16-cache path (sdpa), both in fp32: measured rel L2 0.0011-0.0016 per
    chunk, without and with the rolling window; 0.01 bounds it (10x e4m3's 2^-4 relative step would be
    far above it: the denoiser averages the rounding out)."""
    monkeypatch.setattr(a8, "attention_unsupported_reason", lambda *a, **k: None)
    for window in ({}, {"local_attn_frames": 6, "sink_frames": 3}):
        latents = {}
        for mode in ("sdpa", "fp8"):
            cfg = RunConfig.of(
                preset="tiny", attention=mode, device="cpu", dtype="float32", latent_frames=9, **window
            )
            session = build_session(cfg)
            expected = E4M3KVCache if mode == "fp8" else KVCache
            cache = session.executor.state.cache
            assert type(cache) is expected
            session.reset(seed=3)
            latents[mode] = session.generate()
        a, b = latents["sdpa"], latents["fp8"]
        assert torch.isfinite(b).all()
        for i in range(0, 9, 3):
            err = (a[:, i : i + 3] - b[:, i : i + 3]).norm() / a[:, i : i + 3].norm()
            assert 0 < err < 0.01, (window, i, err)


def test_later_calls_quantize_q_by_its_own_amax():
    """q carries no state from the stream: a later chunk's call rounds q under its own per-(batch,
    head) amax, exactly the reference rounding, so a q far beyond the first chunk's range neither
    saturates nor turns into NaN."""
    cache = _cache()
    k, v = _kv(3, seed=1)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 3 * FT, HEADS, DIM, generator=g) * torch.tensor([0.5, 4.0]).view(1, 1, HEADS, 1)
    _write(cache, 1, 0, k, v)
    keys, values = _write(cache, 1, 3, *_kv(3, seed=2))  # a later chunk
    for factor in (1.0, 1e3):
        out = a8.fp8_attention(factor * q, keys, values)
        amax = (factor * q).abs().amax(dim=(1, 3))  # [B, H]
        q_back = _e4m3_round(factor * q, e4m3.E4M3_MAX / amax)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, attention(q_back, keys.dequantized(), values.dequantized()))
        assert torch.equal(q_back.abs().amax(dim=(1, 3)), amax)  # each head's largest |q| maps to 448 exactly


def _e4m3_round(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [B, L, H, D] rounded to e4m3 under scale [B, H], saturating, and back (fp32)."""
    s = scale[:, None, :, None]
    return (q * s).clamp(-e4m3.E4M3_MAX, e4m3.E4M3_MAX).to(torch.float8_e4m3fn).float() / s


@pytest.fixture
def keys_rotated(monkeypatch):
    """The cache with its keys stored rotated (E4M3KVCache.rotate_keys, off by default)."""
    monkeypatch.setattr(E4M3KVCache, "rotate_keys", True)


def test_the_default_stores_the_keys_unrotated():
    assert E4M3KVCache.rotate_keys is False and _cache().rotation is None


def test_the_rotation_is_orthogonal_and_fixed():
    r = e4m3.incoherent_rotation(DIM, "cpu")
    torch.testing.assert_close(r @ r.T, torch.eye(DIM), atol=1e-6, rtol=0)
    assert torch.equal(r, e4m3.incoherent_rotation(DIM, "cpu"))  # every stream, layer and head: one matrix
    assert e4m3.incoherent_rotation(24, "cpu") is None  # no Sylvester Hadamard matrix of that size


def test_rotated_keys_dequantize_to_the_keys_less_their_offset(keys_rotated):
    """The window's keys come back rotated back: k less its mean, to e4m3's relative precision (2^-4 per
    element in the rotated space; measured rel L2 ~0.02)."""
    cache = _cache()
    k, v = _kv(3, seed=0)
    keys, _ = _write(cache, 0, 0, k, v)
    assert keys.rotation is cache.rotation
    exact = k - k.mean(dim=1, keepdim=True)
    assert (keys.dequantized() - exact).norm() / exact.norm() < 2**-4


def test_fp8_attention_with_rotated_keys_rounds_q_and_k_in_the_rotated_space(keys_rotated):
    """q is rotated like the keys before its per-call rounding: the output is exact attention over
    rotated-then-rounded q and k (the scores of rotated pairs are the scores), and close to exact."""
    cache = _cache()
    k, v = _kv(3, seed=1)
    q = torch.randn(1, 3 * FT, HEADS, DIM, generator=torch.Generator().manual_seed(7))
    keys, values = _write(cache, 0, 0, k, v)
    out = a8.fp8_attention(q, keys, values)
    r = cache.rotation

    def rounded(x):
        return e4m3.E4M3(*e4m3.quantize_per_head(x)).dequantized()

    per_call = attention(rounded(q @ r), rounded(e4m3.smooth_keys(k) @ r), values.dequantized())
    torch.testing.assert_close(out, per_call, rtol=1e-5, atol=1e-6)
    exact = attention(q, k, v)
    assert (out - exact).norm() / exact.norm() < 0.08


def test_a_video_with_rotated_keys_stays_close(monkeypatch, keys_rotated):
    """A whole tiny video (head dim 32) through the runner with the keys rotated, against the bf16-cache
    path (sdpa), both fp32: within the bound of the unrotated cache's video test."""
    monkeypatch.setattr(a8, "attention_unsupported_reason", lambda *a, **k: None)
    latents = {}
    for mode in ("sdpa", "fp8"):
        cfg = RunConfig.of(preset="tiny", attention=mode, device="cpu", dtype="float32", latent_frames=9)
        session = build_session(cfg)
        if mode == "fp8":
            assert session.executor.state.cache.rotation is not None
        session.reset(seed=3)
        latents[mode] = session.generate()
    a, b = latents["sdpa"], latents["fp8"]
    err = (a - b).norm() / a.norm()
    assert 0 < err < 0.01, err
