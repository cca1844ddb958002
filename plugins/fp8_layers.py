"""The FP8 block layers apply_fp8 (plugins/fp8.py) swaps in: e4m3 GEMMs fed by the fused row
quantizations of plugins/e4m3_rows.py.

    E4M3Rows                  (data [..., K] e4m3, scale [..., 1] fp32): a quantized activation
    E4M3Linear                Linear with an e4m3 weight (a scale per output channel); takes an
                              E4M3Rows, or a tensor it quantizes per row (quant_e4m3)
    E4M3AdaptedLinear         a stream block's: the base block's E4M3Linear (shared) + the stream
                              adapter's low-rank delta in the activations' dtype
    E4M3ModulatedLayerNorm    norm1 / norm2 whose output is E4M3Rows (modulated_norm_quant_e4m3)
    E4M3LayerNorm             norm3 (affine) whose output is E4M3Rows (norm_quant_e4m3)
    FP8FeedForward            up E4M3Linear -> gelu_quant_e4m3 -> down E4M3Linear

A norm is swapped only where every Linear that reads its output is an E4M3Linear (fp8-ffn keeps
norm1 and the attention projections in bf16). What the block then runs per FP8 GEMM: one row kernel
that produces the e4m3 input and its scales (one read of the bf16 input, one write of the codes)
and one `torch._scaled_mm` (rowwise scales, fast accumulation, bias and bf16 output in its epilogue).
Weights come from torchao's quantize-at-load (its float8 config, one scale per output channel).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ropesp.model.wan import FeedForward, LayerNorm, ModulatedLayerNorm
from ropesp.plugins.e4m3_rows import gelu_quant_e4m3, modulated_norm_quant_e4m3, norm_quant_e4m3, quant_e4m3


class E4M3Rows(NamedTuple):
    """An activation in e4m3 with one scale per row: value ~= data * scale."""

    data: torch.Tensor  # [..., K] float8_e4m3fn
    scale: torch.Tensor  # [..., 1] fp32


class E4M3Linear(nn.Module):
    """A Linear whose weight is e4m3 with one scale per output channel, fed an e4m3 input with one
    scale per row: out = (x8 * x_scale) @ (weight * weight_scale)^T + bias, in out_dtype.

    weight [N, K] float8_e4m3fn, weight_scale [1, N] fp32 and bias [N] are plain buffers (torch.compile
    and CUDA graphs see ordinary tensors); on CUDA one `torch._scaled_mm`, elsewhere the same math
    dequantized in fp32."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype))

    @classmethod
    def from_quantized(cls, linear: nn.Linear) -> E4M3Linear:
        """The E4M3Linear of a Linear whose weight torchao quantized to float8 (`qdata` [N, K] e4m3,
        `scale` with one value per output channel; its dtype is the model's)."""
        weight = linear.weight
        if not hasattr(weight, "qdata") or weight.qdata.dtype != torch.float8_e4m3fn:
            raise TypeError(f"E4M3Linear: the weight is {type(weight).__name__}, not torchao's e4m3 float8")
        if weight.scale.numel() != weight.shape[0]:
            raise TypeError(
                f"E4M3Linear: the weight's scale has {weight.scale.numel()} values, not one per row"
            )
        return cls(weight.qdata.detach(), weight.scale.detach(), linear.bias, weight.dtype)

    def forward(self, x: E4M3Rows | torch.Tensor) -> torch.Tensor:
        """x: E4M3Rows (data [..., K], scale [..., 1]) or a [..., K] tensor -> [..., N] out_dtype."""
        lead, x8, x_scale = _flat_rows(x)
        return self._gemm(x8, x_scale).unflatten(0, lead)

    def _gemm(self, x8: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """x8 [M, K] e4m3, x_scale [M, 1] fp32 -> [M, N] out_dtype."""
        if x8.is_cuda:
            out = torch._scaled_mm(
                x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=self.bias,
                out_dtype=self.out_dtype, use_fast_accum=True,
            )  # fmt: skip
        else:
            w = self.weight.float() * self.weight_scale.t()  # [N, K]
            out = (x8.float() * x_scale) @ w.t()
            out = (out if self.bias is None else out + self.bias.float()).to(self.out_dtype)
        return out


class E4M3AdaptedLinear(E4M3Linear):
    """A stream block's Linear (ropesp.model.wan: the stream adapter's blocks) under FP8: the base
    block's E4M3Linear, its e4m3 weight, scale and bias shared (the same tensors), plus the adapter's
    rank-r delta in out_dtype on the same rounded input:
    out = x' @ (W8 * scale)^T + bias + (x' @ down^T) @ up^T, where x' = x8 * x_scale.

    Rounding the merged weight W + up @ down to e4m3 instead gives the stream blocks a rounding of
    their own, independent of the base blocks' whose keys and values share the cache with theirs, and a
    second e4m3 copy of every weight. The demo model's score under FP8 GEMMs against fp32, this way /
    merged: 0.024 / 0.028 below on 32 pairs, 0.010 / 0.014 on 96 (apply_fp8 on the CPU with e4m3
    weights; bench/RESULTS.md twenty-sixth session)."""

    @classmethod
    def of(cls, base: E4M3Linear, delta: nn.Module) -> E4M3AdaptedLinear:
        """base: the base block's E4M3Linear; delta: its LowRankDelta (down [r, K], up [N, r])."""
        if type(base) is not E4M3Linear:
            raise TypeError(f"E4M3AdaptedLinear: the base is a {type(base).__name__}, not an E4M3Linear")
        linear = cls(base.weight, base.weight_scale, None, base.out_dtype)
        # the base's tensors themselves (the constructor's reshape would make new views of them)
        linear.weight, linear.weight_scale, linear.bias = base.weight, base.weight_scale, base.bias
        linear.register_buffer("down", delta.down.detach().to(base.out_dtype).contiguous())
        linear.register_buffer("up", delta.up.detach().to(base.out_dtype).contiguous())
        return linear

    def forward(self, x: E4M3Rows | torch.Tensor) -> torch.Tensor:
        """x: E4M3Rows (data [..., K], scale [..., 1]) or a [..., K] tensor -> [..., N] out_dtype."""
        lead, x8, x_scale = _flat_rows(x)
        rounded = (x8.float() * x_scale).to(self.out_dtype)  # [M, K]: what the e4m3 GEMM multiplies
        delta = F.linear(F.linear(rounded, self.down), self.up)  # [M, N]
        return (self._gemm(x8, x_scale) + delta).unflatten(0, lead)


def _flat_rows(x: E4M3Rows | torch.Tensor) -> tuple[torch.Size, torch.Tensor, torch.Tensor]:
    """x: E4M3Rows or a [..., K] tensor (quantized here, a scale per row) -> (x's leading shape, x8 [M, K]
    e4m3, x_scale [M, 1] fp32)."""
    if isinstance(x, E4M3Rows):
        return x.data.shape[:-1], x.data.flatten(0, -2), x.scale.flatten(0, -2)
    x8, x_scale = quant_e4m3(x.flatten(0, -2))
    return x.shape[:-1], x8, x_scale


def _rows(out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> E4M3Rows:
    """An op's (x8 [M, K], scale [M, 1]) with x's leading shape [..., K] again."""
    return E4M3Rows(out[0].view(x.shape), out[1].view(*x.shape[:-1], 1))


class E4M3ModulatedLayerNorm(ModulatedLayerNorm):
    """ModulatedLayerNorm whose output is the E4M3Rows of the E4M3Linears that read it."""

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frame_of_token: torch.Tensor
    ) -> E4M3Rows:
        """x [B, L, C]; shift, scale [B, F, C]; frame_of_token [L] int64 -> E4M3Rows [B, L, C]."""
        # the kernel reads each token's (batch, frame) row of the tables and adds the 1 itself: no
        # per-token tables, no [B, F, C] 1 + scale (a small kernel of ~9 us per call on an H200)
        return _rows(modulated_norm_quant_e4m3(x, shift, scale, frame_of_token, self.eps), x)


class E4M3LayerNorm(LayerNorm):
    """The affine LayerNorm (norm3) whose output is E4M3Rows."""

    def forward(self, x: torch.Tensor) -> E4M3Rows:
        """x [..., C] -> E4M3Rows [..., C]."""
        return _rows(norm_quant_e4m3(x.flatten(0, -2), self.weight, self.bias, self.eps), x)


class FP8FeedForward(FeedForward):
    """FeedForward with both Linears as E4M3Linear and the GELU fused into the down projection's input
    quantization (gelu_quant_e4m3): `_scaled_mm` has no GELU epilogue, and Inductor's GELU + row
    quantization of the [L, ffn_dim] activation took 159 us a call on an H200 against this kernel's 42
    (bench/RESULTS.md thirteenth session)."""

    @classmethod
    def from_quantized(cls, ffn: FeedForward) -> FP8FeedForward:
        """Turn ffn, whose Linears torchao quantized to float8 (or are E4M3Linears already), into an
        FP8FeedForward in place."""
        for i in (0, 2):
            if not isinstance(ffn[i], E4M3Linear):
                ffn[i] = E4M3Linear.from_quantized(ffn[i])
        ffn.__class__ = cls
        return ffn

    def forward(self, x: E4M3Rows | torch.Tensor) -> torch.Tensor:
        """x [..., C] (or its E4M3Rows) -> [..., C] in the Linears' out_dtype."""
        up, _, down = self
        h = up(x)  # [..., ffn_dim]
        return down(_rows(gelu_quant_e4m3(h.flatten(0, -2)), h))


def swap_class(module: nn.Module, cls: type) -> None:
    """Give module (an instance of cls's base) cls's forward, keeping its state."""
    if not isinstance(module, cls.__mro__[1]):
        raise TypeError(f"{cls.__name__}: expected a {cls.__mro__[1].__name__}, got {type(module).__name__}")
    module.__class__ = cls
