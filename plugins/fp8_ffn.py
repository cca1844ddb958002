"""The FFN's hidden activation in one pass: GELU (tanh) and its rowwise e4m3 quantization, op
`ropesp::gelu_quant_e4m3`, and the FP8 FFN built on it.

    gelu_quant_e4m3(h) -> (h8, scale)   h [M, K] -> h8 [M, K] float8_e4m3fn, scale [M, 1] fp32,
                                        gelu_tanh(h) ~= h8 * scale (row amax -> 448)
    FP8FeedForward                      FeedForward whose down projection takes h8 directly

Why a kernel of its own: in bf16 the GELU is the up GEMM's cuBLASLt epilogue, free. `_scaled_mm` has no
GELU epilogue, so with both FFN Linears in FP8 the [L, ffn_dim] activation (4680 x 8960 at Wan-1.3B 480p)
goes through GELU and the down projection's row amax and cast; Inductor generated that as one looped
reduction which took 159 us per call on an H200 (163 ms of a 1.86 s video, ~1.3 TB/s, where the bf16
GEMM it feeds takes 164 us; bench/RESULTS.md thirteenth session). Here one program holds a whole row
in registers: one read of h (bf16), one write of h8 and its scale; 42 us a call (3.0 TB/s).

Forms as plugins/rope_sp.py: `gelu_quant_ref` (pure torch, the CPU kernel and the tests' reference),
`_gelu_quant_kernel` (Triton, CUDA) and the op (`torch.library.triton_op` where triton imports, so
torch.compile keeps the kernel inside its graphs and CUDA graphs capture it; else a `custom_op`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.library import wrap_triton

from ropesp.model.wan import FeedForward
from ropesp.plugins.attention_8bit import E4M3_MAX

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

OP_NAME = "ropesp::gelu_quant_e4m3"
MIN_AMAX = 1e-12
"""A row of zeros keeps a finite scale (torchao's float8 scales clamp the same way)."""
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW = 32768
"""Longest row one program holds in registers (Wan-14B's ffn_dim is 13824)."""


def check_args(h: torch.Tensor) -> None:
    """Raise ValueError naming what is wrong with h."""
    if h.dim() != 2:
        raise ValueError(f"gelu_quant_e4m3: h must be [M, K], got shape {tuple(h.shape)}")
    if h.dtype not in DTYPES:
        raise ValueError(f"gelu_quant_e4m3: h has dtype {h.dtype}; accepted: {DTYPES}")
    if not 0 < h.shape[1] <= MAX_ROW:
        raise ValueError(f"gelu_quant_e4m3: row length {h.shape[1]} must be in [1, {MAX_ROW}]")


def gelu_quant_ref(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (pure torch, any device): h [M, K] -> (h8 [M, K] e4m3, scale [M, 1] fp32), GELU in
    fp32, h8 = gelu / scale rounded to nearest, scale = max(row amax, MIN_AMAX) / 448."""
    check_args(h)
    g = F.gelu(h.float(), approximate="tanh")
    scale = g.abs().amax(dim=1, keepdim=True).clamp_min(MIN_AMAX) / E4M3_MAX  # [M, 1]
    return (g / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


if triton is not None:

    @triton.jit
    def _gelu(x):
        """GELU (tanh) of fp32 x; tanh through the hardware's approximate tanh (one MUFU instruction,
        relative error ~2^-11, far below e4m3's 2^-4 step): with libdevice's tanhf (~20 instructions)
        and a row padded to a power of two the kernel is compute-bound (0.165 ms for 4680 x 8960 on an
        H200 against 0.042 ms this way)."""
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (x + 0.044715 x^3)
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [inner], dtype=tl.float32, is_pure=True, pack=1
        )
        return 0.5 * x * (1.0 + t)

    @triton.jit
    def _piece(H, row_h, start, n_cols, SIZE: tl.constexpr):
        """GELU of columns [start, start + SIZE) of one row (masked past n_cols) and its amax."""
        cols = start + tl.arange(0, SIZE)
        g = _gelu(tl.load(H + row_h + cols, mask=cols < n_cols, other=0.0).to(tl.float32))
        return g, tl.max(tl.abs(g), axis=0)  # masked lanes: gelu(0) = 0, no effect on the amax

    @triton.jit
    def _store(Q, row_q, start, n_cols, g, inv, SIZE: tl.constexpr):
        cols = start + tl.arange(0, SIZE)
        q = tl.clamp(g * inv, -448.0, 448.0)
        tl.store(Q + row_q + cols, q.to(tl.float8e4nv), mask=cols < n_cols)

    @triton.jit
    def _gelu_quant_kernel(
        H,  # h [M, K], row stride stride_h
        Q,  # h8 [M, K] float8_e4m3fn, contiguous
        S,  # scale [M] fp32
        n_cols,  # K
        stride_h,
        B0: tl.constexpr,  # the row as three power-of-two pieces B0 >= B1 >= B2 that cover K with
        B1: tl.constexpr,  # little or no padding (8960 = 8192 + 512 + 256); a piece of 1 past K is
        B2: tl.constexpr,  # absent (masked)
    ):
        """Program = one row: GELU(tanh) in fp32, its amax, the scaled cast; the row never leaves
        registers (~9 fp32 values a thread at K = 8960 with 32 warps)."""
        row = tl.program_id(0).to(tl.int64)
        row_h, row_q = row * stride_h, row * n_cols
        g0, m0 = _piece(H, row_h, 0, n_cols, B0)
        g1, m1 = _piece(H, row_h, B0, n_cols, B1)
        g2, m2 = _piece(H, row_h, B0 + B1, n_cols, B2)
        amax = tl.maximum(tl.maximum(tl.maximum(m0, m1), m2), 1e-12)
        inv = 448.0 / amax
        _store(Q, row_q, 0, n_cols, g0, inv, B0)
        _store(Q, row_q, B0, n_cols, g1, inv, B1)
        _store(Q, row_q, B0 + B1, n_cols, g2, inv, B2)
        tl.store(S + row, amax / 448.0)

else:
    _gelu_quant_kernel = None


def pieces(k: int) -> tuple[int, int, int]:
    """K as the kernel's three power-of-two pieces (B0, B1, B2): the two largest powers of two that
    fit, then the next power of two over what is left; an absent piece is 1 (it starts at K, masked).
    8960 -> (8192, 512, 256), 13824 -> (8192, 4096, 2048), 1536 -> (1024, 512, 1)."""
    b0 = 1 << (k.bit_length() - 1)
    rest = k - b0
    b1 = 1 << (rest.bit_length() - 1) if rest else 1
    rest -= b1 if rest else 0
    b2 = 1 << (rest - 1).bit_length() if rest else 1
    return b0, b1, b2


def _num_warps(k: int) -> int:
    """8 warps (4 for short rows): at K = 8960 on an H200, 0.0415 ms against 0.0440 with 4 warps and
    0.0751 with 32 (bench/RESULTS.md thirteenth session)."""
    return 8 if k >= 2048 else 4


def launch(h: torch.Tensor, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `_gelu_quant_kernel` on CUDA h [M, K] (unit column stride): (h8, scale) as gelu_quant_ref.
    num_warps: None picks `_num_warps` (scripts/fp8_probe.py times the others)."""
    m, k = h.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=h.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=h.device)
    b0, b1, b2 = pieces(k)
    warps = num_warps or _num_warps(k)
    wrap_triton(_gelu_quant_kernel)[(m,)](h, q, scale, k, h.stride(0), B0=b0, B1=b1, B2=b2, num_warps=warps)
    return q, scale


def _gelu_quant(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op body: Triton on CUDA (allocate + launch only, so tracing yields the fake), else the
    reference."""
    check_args(h)
    if _gelu_quant_kernel is None or h.device.type != "cuda":
        return gelu_quant_ref(h)
    return launch(h if h.stride(1) == 1 else h.contiguous())


if triton is not None:
    gelu_quant_e4m3 = torch.library.triton_op(OP_NAME, _gelu_quant, mutates_args=())
else:
    gelu_quant_e4m3 = torch.library.custom_op(OP_NAME, _gelu_quant, mutates_args=())

    @gelu_quant_e4m3.register_fake
    def _(h):
        check_args(h)
        return (
            torch.empty(h.shape, dtype=torch.float8_e4m3fn, device=h.device),
            torch.empty((h.shape[0], 1), dtype=torch.float32, device=h.device),
        )


# the CPU kernel as a plain dispatcher kernel (custom_op's register_kernel would import Dynamo on first call)
_CPU_KERNELS = torch.library.Library(OP_NAME.split("::")[0], "FRAGMENT")
_CPU_KERNELS.impl(OP_NAME.split("::")[1], gelu_quant_ref, "CPU")


class E4M3Linear(nn.Module):
    """A Linear whose weight is e4m3 with one scale per output channel, fed an e4m3 input with one
    scale per row: out = (x8 * x_scale) @ (weight * weight_scale)^T + bias, bf16 out.

    weight [N, K] float8_e4m3fn, weight_scale [1, N] fp32 and bias [N] are plain buffers (torch.compile
    and CUDA graphs see ordinary tensors); on CUDA one `torch._scaled_mm` (rowwise scales, fast
    accumulation, the bias in its epilogue), elsewhere the same math dequantized in fp32."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach())

    def forward(self, x8: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x8 [M, K] e4m3, x_scale [M, 1] fp32 -> [M, N] out_dtype."""
        if x8.is_cuda:
            bias = None if self.bias is None else self.bias.to(out_dtype)
            return torch._scaled_mm(
                x8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, bias=bias,
                out_dtype=out_dtype, use_fast_accum=True,
            )  # fmt: skip
        w = self.weight.float() * self.weight_scale.t()  # [N, K]
        out = (x8.float() * x_scale) @ w.t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(out_dtype)


class FP8FeedForward(FeedForward):
    """FeedForward with FP8 GEMMs: the up projection as torchao quantized it (its input quantized per
    row inside the compiled region before it), then gelu_quant_e4m3, then the down projection as an
    E4M3Linear. Made from a FeedForward whose Linears torchao has quantized (`from_quantized`)."""

    @classmethod
    def from_quantized(cls, ffn: FeedForward) -> FP8FeedForward:
        """Turn ffn, whose down Linear holds a torchao float8 weight (`qdata` [N, K] e4m3, `scale` with
        one value per output channel), into an FP8FeedForward in place; returns it."""
        down = ffn[2]
        weight = down.weight
        if not hasattr(weight, "qdata") or weight.qdata.dtype != torch.float8_e4m3fn:
            raise TypeError(
                f"FP8FeedForward: the down projection's weight is {type(weight).__name__}, not e4m3"
            )
        ffn[2] = E4M3Linear(weight.qdata.detach(), weight.scale.detach(), down.bias)
        ffn.__class__ = cls
        return ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., C] in x's dtype."""
        up, _, down = self
        h = up(x.flatten(0, -2))  # [M, ffn_dim]
        h8, scale = gelu_quant_e4m3(h)
        return down(h8, scale, x.dtype).unflatten(0, x.shape[:-1])
