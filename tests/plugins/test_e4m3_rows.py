"""The row quantizations of plugins/e4m3_rows.py on the CPU: each reference's math, the ops' dispatch
to them and their errors. The Triton kernel is checked against these references on a GPU
(tests/plugins/test_fp8_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ropesp.plugins import e4m3_rows as rows
from ropesp.plugins.e4m3_rows import E4M3_MAX


def _x(m: int = 6, k: int = 40, seed: int = 0) -> torch.Tensor:
    """Rows of very different ranges and offsets, as a block's tokens have."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-2, 2, m).view(-1, 1)
    return torch.randn(m, k, generator=g) * spread + torch.randn(m, 1, generator=g) * spread


def _assert_rounded(v8: torch.Tensor, scale: torch.Tensor, value: torch.Tensor) -> None:
    """v8 * scale is value rounded per row to e4m3: each row's amax lands on 448 exactly, the rest
    within e4m3's rounding (2^-4 relative in the normal range, half a subnormal step 2^-10 of the
    scale below it)."""
    assert v8.dtype == torch.float8_e4m3fn and v8.shape == value.shape
    assert scale.dtype == torch.float32 and scale.shape == (value.shape[0], 1)
    torch.testing.assert_close(scale, value.abs().amax(dim=1, keepdim=True) / E4M3_MAX)
    assert torch.equal(v8.float().abs().amax(dim=1), torch.full((value.shape[0],), E4M3_MAX))
    back = v8.float() * scale
    assert ((back - value).abs() <= value.abs() * 2**-4 + 2**-10 * scale).all()


def test_quant_reference_rounds_each_row():
    x = _x()
    _assert_rounded(*rows.quant_ref(x), x)


def test_gelu_reference_is_gelu_rounded_per_row():
    h = _x()
    _assert_rounded(*rows.gelu_quant_ref(h), F.gelu(h, approximate="tanh"))


def test_norm_reference_is_the_affine_layer_norm_rounded_per_row():
    x = _x(k=48)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(48, generator=g), torch.randn(48, generator=g)
    want = F.layer_norm(x, (48,), weight, bias, 1e-6)
    _assert_rounded(*rows.norm_quant_ref(x, weight, bias, 1e-6), want)


def test_modulated_reference_reads_each_tokens_batch_and_frame():
    """Two batches of four tokens over three frames: token l of batch b takes (1 + scale[b, f]) and
    shift[b, f] of its frame f = frame_of_token[l]."""
    x = _x(m=8, k=48).view(2, 4, 48)
    g = torch.Generator().manual_seed(4)
    shift, scale = torch.randn(2, 3, 48, generator=g), torch.randn(2, 3, 48, generator=g)
    frame_of_token = torch.tensor([0, 1, 1, 2])
    want = torch.stack(
        [
            F.layer_norm(x[b, token], (48,), eps=1e-6) * (1 + scale[b, f]) + shift[b, f]
            for b in range(2)
            for token, f in enumerate(frame_of_token.tolist())
        ]
    )
    _assert_rounded(*rows.modulated_norm_quant_ref(x, shift, scale, frame_of_token, 1e-6), want)


def test_a_row_of_zeros_stays_finite():
    for v8, scale in (rows.quant_ref(torch.zeros(2, 8)), rows.gelu_quant_ref(torch.zeros(2, 8))):
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert torch.equal(v8.float(), torch.zeros(2, 8))
    v8, scale = rows.norm_quant_ref(torch.ones(2, 8), torch.ones(8), torch.zeros(8), 1e-6)  # variance 0
    assert torch.isfinite(scale).all() and torch.equal(v8.float(), torch.zeros(2, 8))


def test_the_ops_run_the_references_on_the_cpu():
    x = _x(k=48, seed=1).bfloat16()
    w, b = torch.randn(48).bfloat16(), torch.randn(48).bfloat16()
    shift, scale, frame_of_token = (
        torch.randn(2, 2, 48).bfloat16(),
        torch.randn(2, 2, 48).bfloat16(),
        torch.tensor([0, 1, 1]),
    )
    pairs = [
        (rows.quant_e4m3(x), rows.quant_ref(x)),
        (rows.gelu_quant_e4m3(x), rows.gelu_quant_ref(x)),
        (rows.norm_quant_e4m3(x, w, b, 1e-6), rows.norm_quant_ref(x, w, b, 1e-6)),
        (
            rows.modulated_norm_quant_e4m3(x.view(2, 3, 48), shift, scale, frame_of_token, 1e-6),
            rows.modulated_norm_quant_ref(x.view(2, 3, 48), shift, scale, frame_of_token, 1e-6),
        ),
    ]
    for got, want in pairs:
        for g, w_ in zip(got, want):
            assert torch.equal(g.float(), w_.float())


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(2, 3, 4), r"gelu_quant_e4m3: the input must be \[M, K\]"),
        (torch.zeros(2, 4, dtype=torch.int32), "dtype torch.int32"),
        (torch.zeros(2, 0), "row length 0"),
        (torch.zeros(1, rows.MAX_ROW + 1), f"row length {rows.MAX_ROW + 1}"),
    ],
)
def test_bad_inputs_name_what_is_wrong(x, message):
    with pytest.raises(ValueError, match=message):
        rows.gelu_quant_e4m3(x)


def test_bad_tables_name_the_argument():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"norm_quant_e4m3: bias must be \[K\] with K = 8, got shape \(7,\)"):
        rows.norm_quant_e4m3(x, torch.ones(8), torch.zeros(7), 1e-6)
    x, tables, frames = torch.zeros(2, 4, 8), torch.zeros(2, 3, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"modulated_norm_quant_e4m3: x must be \[B, L, K\], got shape \(8, 8\)"
    ):
        rows.modulated_norm_quant_e4m3(x.view(8, 8), tables, tables, frames, 1e-6)
    with pytest.raises(
        ValueError,
        match=r"scale must be \[B, F, K\] with B = 2, K = 8 \(F as shift's\), got shape \(2, 2, 8\)",
    ):
        rows.modulated_norm_quant_e4m3(x, tables, tables[:, :2], frames, 1e-6)
    with pytest.raises(
        ValueError, match=r"frame_of_token must be int64 \[L\] with L = 4, got torch.int32 \(4,\)"
    ):
        rows.modulated_norm_quant_e4m3(x, tables, tables, frames.int(), 1e-6)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (8960, (8192, 512, 256)),
        (13824, (8192, 4096, 2048)),
        (1536, (1024, 512, 1)),
        (5120, (4096, 1024, 1)),
        (7, (4, 2, 1)),
        (1, (1, 1, 1)),
    ],
)
def test_pieces_cover_the_row(k, expected):
    got = rows.pieces(k)
    assert got == expected
    b0, b1, b2 = got
    assert b0 <= k <= b0 + b1 + b2  # the first piece is whole, the three reach K
