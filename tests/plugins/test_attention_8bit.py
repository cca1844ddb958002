"""8-bit attention selection (plugins/attention_8bit.py): the e4m3 per-head quantization, the
selector wired into the runners, and the refusals where the kernels cannot run. The kernels
themselves (FlashAttention-3 e4m3, SageAttention) need a GPU: scripts/fp8_probe.py measures them."""

from __future__ import annotations

import pytest
import torch

from ropesp.config import CacheConfig, VideoGeometry
from ropesp.errors import ConfigError
from ropesp.model.kv_cache import attention
from ropesp.plugins import attention_8bit as a8
from ropesp.plugins import e4m3
from ropesp.runtime.dist import Mapping
from ropesp.runtime.pipeline import resolve
from ropesp.runtime.runners import SPState
from ropesp.settings import RunConfig


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_quantize_per_head_round_trips_within_e4m3_rounding(scale):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 37, 3, 16, generator=g) * scale).bfloat16()
    x[1, :, 2] *= 40  # heads of very different ranges get their own scales
    x8, descale = e4m3.quantize_per_head(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert descale.shape == (2, 3) and descale.dtype == torch.float32
    # the head's absolute maximum lands on e4m3's largest value: the whole range is used, nothing clips
    amax8 = x8.float().abs().amax(dim=(1, 3))
    torch.testing.assert_close(amax8, torch.full_like(amax8, e4m3.E4M3_MAX))
    back = x8.float() * descale[:, None, :, None]
    # e4m3 keeps 3 mantissa bits: relative step 2^-3, so rounding to nearest errs by <= 2^-4 of |x|
    # for normal values; values below the normal range (2^-6 * descale) err by <= half a subnormal step
    tiny = 2.0**-9 * descale[:, None, :, None]
    assert ((back - x.float()).abs() <= x.float().abs() * 2**-4 + tiny).all()


def test_quantize_per_head_of_zeros_is_finite():
    x8, descale = e4m3.quantize_per_head(torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16))
    assert torch.isfinite(descale).all() and (x8.float() == 0).all()


def _e4m3_attention(q, k, v):
    """The e4m3 kernel's input rounding, emulated in fp32: each of q, k, v through quantize_per_head and
    back, then exact attention (what the quantization alone costs, without the kernel)."""

    def back(x8, descale):
        return x8.float() * descale[:, None, :, None]

    return attention(
        back(*e4m3.quantize_per_head(q)), back(*e4m3.quantize_per_head(k)), back(*e4m3.quantize_per_head(v))
    )


def test_smoothed_keys_leave_attention_unchanged():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 24, 3, 16, generator=g) for _ in range(3))
    k = k + 5 * torch.randn(2, 1, 3, 16, generator=g)  # an offset shared by every key of a head
    torch.testing.assert_close(attention(q, e4m3.smooth_keys(k), v), attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_smoothed_keys_cut_the_e4m3_error_of_offset_keys():
    """Keys with a large shared offset (as qk-normed DiT keys have): one e4m3 scale per head spends the
    range on the offset, and the keys' differences, which decide softmax, round coarsely; smoothing
    takes the offset out first. Fixed seed; the measured ratio is 5.3x, the bound asks 3x."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 64, 2, 32, generator=g) for _ in range(3))
    q = 3 * q  # sharp attention, where key rounding shows
    k = k + 8 * torch.randn(1, 1, 2, 32, generator=g)
    exact = attention(q, k, v)
    raw = (_e4m3_attention(q, k, v) - exact).norm()
    smoothed = (_e4m3_attention(q, e4m3.smooth_keys(k), v) - exact).norm()
    assert smoothed * 3 < raw


def test_sdpa_is_the_default_and_what_the_runner_calls():
    assert a8.select_attention("sdpa") is attention
    state = SPState(
        resolve(RunConfig.of()).model,
        VideoGeometry(4, 4),
        CacheConfig(3),
        Mapping(1, 0, 0),
        torch.device("cpu"),
        torch.float32,
    )
    assert state.attend is attention
    runner = state.begin(0, 1, "reference")
    assert runner.cache_attention.attend is attention


def test_the_runner_attends_through_the_selected_kernel(tiny_cfg):
    """A SingleDeviceRunner built with another attend uses it on the cache window (q and the window's k/v)."""
    from ropesp.model.kv_cache import KVCache
    from ropesp.runtime.runners import SingleDeviceRunner

    cache = KVCache(1, 1, 4, CacheConfig(2), 2, 8, torch.float32, "cpu")
    seen = []

    def attend(q, k, v):
        seen.append((q.shape, k.shape, v.shape))
        return attention(q, k, v)

    q = torch.randn(1, 4, 2, 8)
    slots = cache.begin(0, 4)
    out = SingleDeviceRunner(cache, slots, None, attend).attention(0, q, q, q)
    assert seen == [((1, 4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8))]
    torch.testing.assert_close(out, attention(q, q, q))


def test_attention_modes_refused_where_they_cannot_run():
    with pytest.raises(
        ConfigError, match=r"--attention fp8: it needs a CUDA GPU of compute capability >= 9\.0"
    ):
        resolve(RunConfig.of(preset="tiny", attention="fp8"))
    with pytest.raises(
        ConfigError, match=r"--attention int8: it needs a CUDA GPU of compute capability >= 8\.0"
    ):
        resolve(RunConfig.of(preset="tiny", attention="int8"))
    with pytest.raises(ConfigError, match=r"--attention fa3: it needs a CUDA GPU of compute capability"):
        resolve(RunConfig.of(preset="tiny", attention="fa3"))
    with pytest.raises(ConfigError, match="--attention fp4: choose one of"):
        resolve(RunConfig.of(preset="tiny", attention="fp4"))
    with pytest.raises(ConfigError, match=r"the ring layout .* merges partial attentions"):
        resolve(RunConfig.of(preset="tiny", attention="fp8", world_size=2, ulysses_degree=1, ring_degree=2))


def test_every_mode_selects_its_own_kernel():
    kernels = {mode: a8.select_attention(mode) for mode in a8.ATTENTION_MODES}
    assert kernels == {
        "sdpa": attention,
        "fa3": a8.fa3_attention,
        "fp8": a8.fp8_attention,
        "int8": a8.int8_attention,
    }
    with pytest.raises(ConfigError, match="--attention fp16: choose one of"):
        a8.select_attention("fp16")


def test_quantize_per_head_amax_is_per_batch_and_head():
    x = torch.zeros(2, 5, 3, 4)
    x[1, 3, 2, 1] = -7.0  # the only non-zero of (batch 1, head 2)
    x[0, 0, 0, 0] = 2.0
    _, descale = e4m3.quantize_per_head(x)
    assert descale[1, 2] == pytest.approx(7.0 / e4m3.E4M3_MAX)
    assert descale[0, 0] == pytest.approx(2.0 / e4m3.E4M3_MAX)
    assert (descale[0, 1:] < 1e-12).all() and (descale[1, :2] < 1e-12).all()


def test_attention_reason_names_the_missing_library(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(__import__("sys").modules, "fa3_fwd_interface", None)
    with pytest.raises(Exception, match=r'--attention fp8: it needs fa3-fwd: pip install -e "\.\[fp8\]"'):
        a8.check_attention("fp8", "cuda")


def test_int8_refuses_a_head_dim_its_kernels_lack(monkeypatch):
    """SageAttention asserts head dims 64, 96, 128 inside its kernel call; the run's checks refuse first
    (RunConfig passes the model's dim / num_heads), naming the flag. An Ampere-or-newer GPU is
    pretended, as above; the demo model's heads are 32 wide."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(
        ConfigError, match=r"--attention int8: its kernels take head dims \(64, 96, 128\), this model's is 32"
    ):
        a8.check_attention("int8", "cuda", "--attention", head_dim=32)
    assert "head dims" not in (a8.attention_unsupported_reason("int8", "cuda", head_dim=128) or "")


def test_num_splits_keeps_every_piece_within_keys_per_split(monkeypatch):
    monkeypatch.setattr(a8, "KEYS_PER_SPLIT", 4680)
    assert [a8.num_splits(n) for n in (1, 4680, 4681, 9360, 32760)] == [1, 1, 2, 2, 7]
    monkeypatch.setattr(a8, "KEYS_PER_SPLIT", None)
    assert a8.num_splits(32760) == 1


def test_values_offset_comes_back_after_attention():
    """Softmax's weights sum to 1: attention to v - m plus m is attention to v. The e4m3 values carry
    the offset back (dequantized adds it), and fp8_attention's reference gives the same output as
    exact attention over values that were rounded around their mean."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g) for _ in range(3))
    m = 5 * torch.randn(1, 2, 16, generator=g)  # [B, H, D], shared by every value of a head
    torch.testing.assert_close(
        attention(q, k, v - m[:, None]) + m[:, None], attention(q, k, v), atol=1e-5, rtol=1e-5
    )
    v8, descale = e4m3.quantize_per_head(v)  # the values' spread, around 0
    values = e4m3.E4M3(v8, descale, m)
    torch.testing.assert_close(values.dequantized(), v8.float() * descale[:, None, :, None] + m[:, None])
    keys = e4m3.E4M3(*e4m3.quantize_per_head(k))
    out = a8.fp8_attention(q, keys, values)
    q_back = e4m3.E4M3(*e4m3.quantize_per_head(q)).dequantized()
    torch.testing.assert_close(out, attention(q_back, keys.dequantized(), values.dequantized()))
