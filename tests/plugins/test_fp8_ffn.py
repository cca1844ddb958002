"""The FFN's GELU + rowwise e4m3 quantization (plugins/fp8_ffn.py) on the CPU: the reference kernel's
math, the op's dispatch and its errors, E4M3Linear against the dequantized Linear, and the FFN swap.
The Triton kernel is checked against this reference on a GPU (tests/plugins/test_fp8_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ropesp.model.wan import FeedForward
from ropesp.plugins import fp8_ffn
from ropesp.plugins.fp8_ffn import E4M3_MAX, E4M3Linear, FP8FeedForward, gelu_quant_e4m3, gelu_quant_ref


def _h(rows: int = 6, cols: int = 40, seed: int = 0) -> torch.Tensor:
    """Rows of very different ranges, as the FFN's tokens have."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, rows).view(-1, 1)


def test_reference_is_gelu_rounded_per_row_to_e4m3():
    h = _h()
    h8, scale = gelu_quant_ref(h)
    assert h8.dtype == torch.float8_e4m3fn and h8.shape == h.shape
    assert scale.dtype == torch.float32 and scale.shape == (h.shape[0], 1)
    g = F.gelu(h, approximate="tanh")
    torch.testing.assert_close(scale, g.abs().amax(dim=1, keepdim=True) / E4M3_MAX)
    back = h8.float() * scale
    # each row's largest |gelu| lands on 448 exactly; the rest within e4m3's rounding (2^-4 relative
    # in the normal range, half a subnormal step 2^-10 of the scale below it)
    assert torch.equal(h8.float().abs().amax(dim=1), torch.full((h.shape[0],), E4M3_MAX))
    assert ((back - g).abs() <= g.abs() * 2**-4 + 2**-10 * scale).all()


def test_a_row_of_zeros_stays_finite():
    h8, scale = gelu_quant_ref(torch.zeros(2, 8))
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(h8.float(), torch.zeros(2, 8))


def test_the_op_runs_the_reference_on_the_cpu():
    h = _h(seed=1).bfloat16()
    for got, want in zip(gelu_quant_e4m3(h), gelu_quant_ref(h)):
        assert torch.equal(got.float(), want.float())


@pytest.mark.parametrize(
    ("h", "message"),
    [
        (torch.zeros(2, 3, 4), r"h must be \[M, K\]"),
        (torch.zeros(2, 4, dtype=torch.int32), "dtype torch.int32"),
        (torch.zeros(2, 0), "row length 0"),
        (torch.zeros(1, fp8_ffn.MAX_ROW + 1), f"row length {fp8_ffn.MAX_ROW + 1}"),
    ],
)
def test_bad_inputs_name_what_is_wrong(h, message):
    with pytest.raises(ValueError, match=message):
        gelu_quant_e4m3(h)


def _quantized_linear(k: int, n: int, seed: int = 0):
    """An e4m3 weight with one scale per output channel, as torchao's float8 weights hold it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.linspace(0.1, 2, n).view(-1, 1)
    scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX  # [N, 1]
    return (w / scale).to(torch.float8_e4m3fn), scale, torch.randn(n, generator=g)


def test_e4m3_linear_is_the_dequantized_product():
    w8, w_scale, bias = _quantized_linear(40, 12)
    lin = E4M3Linear(w8, w_scale, bias)
    assert lin.weight_scale.shape == (1, 12)
    h8, h_scale = gelu_quant_ref(_h())
    out = lin(h8, h_scale, torch.float32)
    expected = F.linear(h8.float() * h_scale, w8.float() * w_scale, bias)
    torch.testing.assert_close(out, expected)
    assert lin(h8, h_scale, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_feed_forward_is_close_to_the_float_one():
    """FP8FeedForward from a FeedForward whose Linears torchao quantized (its weight-only float8
    config runs on the CPU; the GPU's dynamic-activation config leaves the same e4m3 weights): output
    against the fp32 FFN; measured rel L2 0.045 here (three e4m3 roundings: both weights and the hidden
    activation, each at most 2^-4 relative); 0.08 bounds it."""
    tq = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    ffn = FeedForward(64, 160)
    reference = FeedForward(64, 160)
    reference.load_state_dict(ffn.state_dict())
    tq.quantize_(ffn, tq.Float8WeightOnlyConfig())
    qdata, w_scale = ffn[2].weight.qdata, ffn[2].weight.scale
    fp8 = FP8FeedForward.from_quantized(ffn)
    assert fp8 is ffn and type(fp8) is FP8FeedForward and isinstance(fp8[2], E4M3Linear)
    assert torch.equal(fp8[2].weight.float(), qdata.float())
    torch.testing.assert_close(fp8[2].weight_scale, w_scale.reshape(1, -1).float())
    x = torch.randn(2, 7, 64)
    with torch.inference_mode():
        out, ref = fp8(x), reference(x)
    assert out.shape == ref.shape == x.shape and out.dtype == x.dtype
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.08, rel


def test_a_float_down_projection_is_refused():
    with pytest.raises(TypeError, match="weight is Parameter, not e4m3"):
        FP8FeedForward.from_quantized(FeedForward(8, 16))
