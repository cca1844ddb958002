"""The FP8 block layers (plugins/fp8_layers.py) on the CPU: E4M3Linear against the dequantized
Linear (on E4M3Rows and on a tensor it quantizes), the norms that quantize their output against the
bf16 norms, the FFN swap, and the errors of the conversions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ropesp.model.wan import FeedForward, LayerNorm, LowRankDelta, ModulatedLayerNorm
from ropesp.plugins.e4m3_rows import E4M3_MAX, quant_ref
from ropesp.plugins.fp8_layers import (
    E4M3AdaptedLinear,
    E4M3LayerNorm,
    E4M3Linear,
    E4M3ModulatedLayerNorm,
    E4M3Rows,
    FP8FeedForward,
    swap_class,
)

E4M3_STEP = 2**-3
"""Largest relative gap between neighbouring e4m3 values in the normal range (3 mantissa bits):
rounding to nearest moves a value by at most half of it."""


def _quantized_linear(k: int, n: int, seed: int = 0):
    """An e4m3 weight with one scale per output channel, as torchao's float8 weights hold it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.1, 2, n).view(-1, 1)
    scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX  # [N, 1]
    return (w / scale).to(torch.float8_e4m3fn), scale, torch.randn(n, generator=g)


def test_e4m3_linear_is_the_dequantized_product():
    w8, w_scale, bias = _quantized_linear(40, 12)
    lin = E4M3Linear(w8, w_scale, bias, torch.float32)
    assert lin.weight_scale.shape == (1, 12)
    x = torch.randn(2, 3, 40)
    x8, x_scale = quant_ref(x.flatten(0, 1))
    expected = F.linear(x8.float() * x_scale, w8.float() * w_scale, bias).unflatten(0, (2, 3))
    # a tensor is quantized per row by the layer itself; E4M3Rows are taken as they are
    torch.testing.assert_close(lin(x), expected)
    rows = E4M3Rows(x8.view(2, 3, 40), x_scale.view(2, 3, 1))
    torch.testing.assert_close(lin(rows), expected)
    assert E4M3Linear(w8, w_scale, bias)(x).dtype == torch.bfloat16


def test_adapted_linear_is_the_base_product_plus_the_delta_on_the_same_rounded_input():
    w8, w_scale, bias = _quantized_linear(40, 12)
    base = E4M3Linear(w8, w_scale, bias, torch.float32)
    delta = LowRankDelta(4, 40, 12)
    torch.nn.init.normal_(delta.up, std=0.1)
    adapted = E4M3AdaptedLinear.of(base, delta)
    # the base's e4m3 weight, scale and bias themselves, not copies
    assert adapted.weight is base.weight and adapted.weight_scale is base.weight_scale
    assert adapted.bias is base.bias
    x = torch.randn(2, 3, 40)
    x8, x_scale = quant_ref(x.flatten(0, 1))
    rounded = x8.float() * x_scale
    expected = base(x) + (rounded @ delta.delta().t()).unflatten(0, (2, 3))
    torch.testing.assert_close(adapted(x), expected)
    torch.testing.assert_close(adapted(E4M3Rows(x8.view(2, 3, 40), x_scale.view(2, 3, 1))), expected)
    assert not torch.allclose(adapted(x), base(x), atol=1e-3)
    # in bf16 the factors are kept in bf16, the output too
    bf16 = E4M3AdaptedLinear.of(E4M3Linear(w8, w_scale, bias), delta)
    assert bf16.up.dtype == bf16.down.dtype == bf16(x).dtype == torch.bfloat16


def test_adapted_linear_refuses_a_base_that_is_not_e4m3():
    with pytest.raises(TypeError, match="the base is a Linear, not an E4M3Linear"):
        E4M3AdaptedLinear.of(torch.nn.Linear(40, 12), LowRankDelta(4, 40, 12))


def test_e4m3_linear_refuses_a_float_weight():
    with pytest.raises(TypeError, match="weight is Parameter, not torchao's e4m3 float8"):
        E4M3Linear.from_quantized(torch.nn.Linear(8, 16))


def _modulation(b: int, frames: int, c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, frames, c, generator=g) * 0.5, torch.randn(b, frames, c, generator=g) * 0.5


def test_modulated_norm_quantizes_what_the_bf16_norm_computes():
    """Batch 2, 3 frames, tokens of frames 0, 0, 1, 2, 2: every token reads its own (batch, frame)
    table row. The e4m3 output is the fp32 norm rounded once, so against the model's norm (which
    rounds to the model dtype first) it is within one e4m3 rounding."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32) * 3 + 1
    shift, scale = _modulation(2, 3, 32)
    frame_of_token = torch.tensor([0, 0, 1, 2, 2])
    norm = ModulatedLayerNorm(1e-6)
    want = norm(x, shift, scale, frame_of_token)  # [2, 5, 32]
    swap_class(norm, E4M3ModulatedLayerNorm)
    got = norm(x, shift, scale, frame_of_token)
    assert isinstance(got, E4M3Rows) and got.data.shape == x.shape and got.scale.shape == (2, 5, 1)
    back = got.data.float() * got.scale
    amax = want.abs().amax(dim=-1, keepdim=True)
    assert ((back - want).abs() <= want.abs() * E4M3_STEP / 2 + amax * 2**-16).all()
    # a swapped batch order moves each batch's tables with it
    flipped = norm(x.flip(0), shift.flip(0), scale.flip(0), frame_of_token)
    assert torch.equal(flipped.data.flip(0).float(), got.data.float())


def test_affine_norm_quantizes_what_the_bf16_norm_computes():
    torch.manual_seed(1)
    norm = LayerNorm(32, 1e-6, affine=True)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 32) * 2
    want = norm(x)
    swap_class(norm, E4M3LayerNorm)
    got = norm(x)
    assert isinstance(got, E4M3Rows) and got.data.shape == x.shape and got.scale.shape == (2, 5, 1)
    back = got.data.float() * got.scale
    amax = want.abs().amax(dim=-1, keepdim=True)
    assert ((back - want).abs() <= want.abs() * E4M3_STEP / 2 + amax * 2**-16).all()


def test_swap_class_refuses_another_module():
    with pytest.raises(TypeError, match="E4M3LayerNorm: expected a LayerNorm, got ModulatedLayerNorm"):
        swap_class(ModulatedLayerNorm(1e-6), E4M3LayerNorm)


def test_fp8_feed_forward_is_close_to_the_float_one():
    """FP8FeedForward from a FeedForward whose Linears torchao quantized (its weight-only float8
    config runs on the CPU; the GPU's dynamic-activation config leaves the same e4m3 weights): output
    against the fp32 FFN, on a tensor and on E4M3Rows of it. Four e4m3 roundings (both weights, the
    input and the hidden activation, each at most 2^-4 relative per value, averaging down in the
    dot products): measured rel L2 0.05 here; 0.08 bounds it."""
    tq = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    ffn = FeedForward(64, 160)
    reference = FeedForward(64, 160)
    reference.load_state_dict(ffn.state_dict())
    tq.quantize_(ffn, tq.Float8WeightOnlyConfig())
    qdata, w_scale = ffn[2].weight.qdata, ffn[2].weight.scale
    fp8 = FP8FeedForward.from_quantized(ffn)
    assert fp8 is ffn and type(fp8) is FP8FeedForward
    assert isinstance(fp8[0], E4M3Linear) and isinstance(fp8[2], E4M3Linear)
    assert torch.equal(fp8[2].weight.float(), qdata.float())
    torch.testing.assert_close(fp8[2].weight_scale, w_scale.reshape(1, -1).float())
    x = torch.randn(2, 7, 64)
    x8, x_scale = quant_ref(x.flatten(0, 1))
    with torch.inference_mode():
        out, ref = fp8(x), reference(x)
        from_rows = fp8(E4M3Rows(x8.view(x.shape), x_scale.view(2, 7, 1)))
    assert out.shape == ref.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(from_rows, out)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.08, rel
