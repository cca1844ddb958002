"""Activations quantized to e4m3 one row (token) at a time, fused with the op that produces them: four
ops on one Triton kernel, for the inputs of the FP8 block GEMMs (plugins/fp8_layers.py).

    quant_e4m3(x)                                  x                         -> (x8, scale)
    gelu_quant_e4m3(h)                             gelu_tanh(h)              -> (h8, scale)
    norm_quant_e4m3(x, weight, bias, eps)          LayerNorm(x) * w + b      -> (h8, scale)
    modulated_norm_quant_e4m3(x, shift, scale, frame_of_token, eps)
                      LayerNorm(x) * (1 + scale[b, frame]) + shift[b, frame] -> (h8, scale)

x, h [M, K] (fp32, fp16 or bf16; unit column stride on CUDA), for the modulated norm [B, L, K] (then
M = B * L); weight, bias [K]; shift, scale [B, F, K] (adaLN tables per batch and frame, any strides);
frame_of_token [L] int64; out: x8 [M, K] float8_e4m3fn and scale [M, 1] fp32 with value ~= x8 *
scale, scale = max(row amax, MIN_AMAX) / 448 (torchao's float8 rowwise scale; `torch._scaled_mm`
takes it as scale_a). The LayerNorm has no affine of its own (Wan's norm1/norm2; norm3's weight and
bias are the `w`, `b` above), statistics in fp32.

Why kernels of their own: `torch._scaled_mm` has no GELU epilogue and no fused input quantization, and
Inductor generates the quantization after a LayerNorm (or GELU) as a looped reduction that reads each
row two or three times: 24-29 us a call for a [4680, 1536] bf16 row block on an H200 (~1 TB/s), 159 us
for GELU at [4680, 8960] (bench/RESULTS.md thirteenth session). Here one program holds one row in
registers: one read of the input, one write of the codes and the scale; on an H200 a LayerNorm +
quantization at [4680, 1536] takes 0.009-0.010 ms (Inductor's code for it 0.033), GELU + quantization
at [4680, 8960] 0.042 ms (0.153; bench/RESULTS.md fourteenth session).

Forms as plugins/rope_sp.py: `*_ref` (pure torch, the CPU kernels and the tests' references),
`_rows_kernel` (Triton, CUDA) and the ops (`torch.library.triton_op` where triton imports, so
torch.compile keeps the kernel inside its graphs and CUDA graphs capture it; else a `custom_op`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import wrap_triton

from ropesp.plugins.e4m3 import E4M3_MAX

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MIN_AMAX = 1e-12
"""A row of zeros keeps a finite scale (torchao's float8 scales clamp the same way)."""
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW = 32768
"""Longest row one program holds in registers (Wan-14B's ffn_dim is 13824)."""
QUANT, GELU, NORM = 0, 1, 2
"""The kernel's MODE: what it applies to a row before quantizing it."""


def check_rows(op: str, x: torch.Tensor) -> None:
    """Raise ValueError naming what is wrong with x [M, K], the input of op `op`."""
    if x.dim() != 2:
        raise ValueError(f"{op}: the input must be [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"{op}: the input has dtype {x.dtype}; accepted: {DTYPES}")
    if not 0 < x.shape[1] <= MAX_ROW:
        raise ValueError(f"{op}: row length {x.shape[1]} must be in [1, {MAX_ROW}]")


def check_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Raise ValueError naming what is wrong with norm_quant_e4m3's x [M, K], weight and bias [K]."""
    op = "norm_quant_e4m3"
    check_rows(op, x)
    for name, vector in (("weight", weight), ("bias", bias)):
        if vector.dim() != 1 or vector.shape[0] != x.shape[1]:
            raise ValueError(
                f"{op}: {name} must be [K] with K = {x.shape[1]}, got shape {tuple(vector.shape)}"
            )


def quantize_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 v [M, K] -> (v8 [M, K] e4m3 rounded to nearest, scale [M, 1] fp32): the ops' last step."""
    scale = v.abs().amax(dim=1, keepdim=True).clamp_min(MIN_AMAX) / E4M3_MAX  # [M, 1]
    return (v / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of quant_e4m3 (pure torch, any device)."""
    check_rows("quant_e4m3", x)
    return quantize_rows(x.float())


def gelu_quant_ref(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of gelu_quant_e4m3: GELU (tanh) in fp32, then quantize_rows."""
    check_rows("gelu_quant_e4m3", h)
    return quantize_rows(F.gelu(h.float(), approximate="tanh"))


def norm_quant_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """Reference of norm_quant_e4m3: LayerNorm(x) * weight + bias in fp32, then quantize_rows."""
    check_norm(x, weight, bias)
    return quantize_rows(F.layer_norm(x.float(), x.shape[1:], weight.float(), bias.float(), eps))


def modulated_norm_quant_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frame_of_token: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of modulated_norm_quant_e4m3: LayerNorm(x) * (1 + scale[:, frame_of_token]) +
    shift[:, frame_of_token] in fp32, then quantize_rows over the B * L rows."""
    check_modulated(x, shift, scale, frame_of_token)
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=eps)  # [B, L, K]
    value = normed * (1 + scale[:, frame_of_token].float()) + shift[:, frame_of_token].float()
    return quantize_rows(value.flatten(0, 1))


def check_modulated(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frame_of_token: torch.Tensor
) -> None:
    """Raise ValueError naming what is wrong with modulated_norm_quant_e4m3's arguments."""
    op = "modulated_norm_quant_e4m3"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, L, K], got shape {tuple(x.shape)}")
    check_rows(op, x.flatten(0, 1))
    b, length, k = x.shape
    for name, table in (("shift", shift), ("scale", scale)):
        if table.dim() != 3 or table.shape[0] != b or table.shape[2] != k or table.shape[1] != shift.shape[1]:
            raise ValueError(
                f"{op}: {name} must be [B, F, K] with B = {b}, K = {k} (F as shift's), got shape {tuple(table.shape)}"
            )
    if frame_of_token.shape != (length,) or frame_of_token.dtype != torch.int64:
        raise ValueError(
            f"{op}: frame_of_token must be int64 [L] with L = {length}, "
            f"got {frame_of_token.dtype} {tuple(frame_of_token.shape)}"
        )


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
    def _load(X, row_x, start, n_cols, SIZE: tl.constexpr):
        """Columns [start, start + SIZE) of one row as fp32 (0 past n_cols) and their mask."""
        cols = start + tl.arange(0, SIZE)
        mask = cols < n_cols
        return tl.load(X + row_x + cols, mask=mask, other=0.0).to(tl.float32), mask

    @triton.jit
    def _centred(x, mean, mask):
        return tl.where(mask, x - mean, 0.0)

    @triton.jit
    def _affine(d, rstd, MUL, ADD, at_mul, at_add, start, n_cols, SIZE: tl.constexpr, ONE_PLUS: tl.constexpr):
        """(centred x) * rstd * (1 +) mul + add over one piece; 0 past n_cols (d is 0 there)."""
        cols = start + tl.arange(0, SIZE)
        mask = cols < n_cols
        mul = tl.load(MUL + at_mul + cols, mask=mask, other=0.0).to(tl.float32)
        add = tl.load(ADD + at_add + cols, mask=mask, other=0.0).to(tl.float32)
        if ONE_PLUS:
            mul = mul + 1.0
        return d * rstd * mul + add

    @triton.jit
    def _store(Q, row_q, start, n_cols, v, inv, SIZE: tl.constexpr):
        cols = start + tl.arange(0, SIZE)
        q = tl.clamp(v * inv, -448.0, 448.0)
        tl.store(Q + row_q + cols, q.to(tl.float8e4nv), mask=cols < n_cols)

    @triton.jit
    def _rows_kernel(
        X,  # x [M, K], row stride stride_x
        Q,  # x8 [M, K] float8_e4m3fn, contiguous
        S,  # scale [M] fp32
        MUL,  # NORM: the LayerNorm's multiplier, [K], or with GATHER [B, F, K] (strides mul_b, mul_f)
        ADD,  # NORM: its addend, as MUL (strides add_b, add_f)
        FOT,  # NORM with GATHER: the frame of each token, [L] int64
        n_cols,  # K
        stride_x,
        tokens,  # L: rows of x per batch
        mul_b,
        mul_f,
        add_b,
        add_f,
        EPS: tl.constexpr,  # NORM: the LayerNorm's epsilon (a runtime float would be fp64 under Inductor)
        MODE: tl.constexpr,  # QUANT, GELU or NORM
        GATHER: tl.constexpr,  # NORM: row (b, l) reads table row (b, FOT[l]) (else the [K] vectors)
        ONE_PLUS: tl.constexpr,  # NORM: multiply by 1 + MUL (adaLN's scale) instead of MUL
        B0: tl.constexpr,  # the row as three power-of-two pieces B0 >= B1 >= B2 that cover K with
        B1: tl.constexpr,  # little or no padding (8960 = 8192 + 512 + 256, 1536 = 1024 + 512); a
        B2: tl.constexpr,  # piece of 1 past K is absent (masked)
    ):
        """Program = one row: the mode's function in fp32, its amax, the scaled cast; the row never
        leaves registers (35 fp32 values a thread at K = 8960 with 8 warps, 12 at K = 1536 with 4)."""
        row = tl.program_id(0).to(tl.int64)
        row_x, row_q = row * stride_x, row * n_cols
        v0, k0 = _load(X, row_x, 0, n_cols, B0)
        v1, k1 = _load(X, row_x, B0, n_cols, B1)
        v2, k2 = _load(X, row_x, B0 + B1, n_cols, B2)
        if MODE == 2:  # LayerNorm: two passes over the registers (mean, then the centred variance)
            mean = (tl.sum(v0, axis=0) + tl.sum(v1, axis=0) + tl.sum(v2, axis=0)) / n_cols
            d0, d1, d2 = _centred(v0, mean, k0), _centred(v1, mean, k1), _centred(v2, mean, k2)
            var = (tl.sum(d0 * d0, axis=0) + tl.sum(d1 * d1, axis=0) + tl.sum(d2 * d2, axis=0)) / n_cols
            rstd = tl.rsqrt(var + EPS)
            if GATHER:
                b = row // tokens
                f = tl.load(FOT + row % tokens)
                at_mul, at_add = b * mul_b + f * mul_f, b * add_b + f * add_f
            else:
                at_mul, at_add = row * 0, row * 0
            v0 = _affine(d0, rstd, MUL, ADD, at_mul, at_add, 0, n_cols, B0, ONE_PLUS)
            v1 = _affine(d1, rstd, MUL, ADD, at_mul, at_add, B0, n_cols, B1, ONE_PLUS)
            v2 = _affine(d2, rstd, MUL, ADD, at_mul, at_add, B0 + B1, n_cols, B2, ONE_PLUS)
        elif MODE == 1:  # masked lanes: gelu(0) = 0, no effect on the amax
            v0, v1, v2 = _gelu(v0), _gelu(v1), _gelu(v2)
        m0 = tl.max(tl.abs(v0), axis=0)
        m1 = tl.max(tl.abs(v1), axis=0)
        m2 = tl.max(tl.abs(v2), axis=0)
        amax = tl.maximum(tl.maximum(tl.maximum(m0, m1), m2), 1e-12)
        inv = 448.0 / amax
        _store(Q, row_q, 0, n_cols, v0, inv, B0)
        _store(Q, row_q, B0, n_cols, v1, inv, B1)
        _store(Q, row_q, B0 + B1, n_cols, v2, inv, B2)
        tl.store(S + row, amax / 448.0)

else:
    _rows_kernel = None


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
    """8 warps for long rows, 2 for short ones. On an H200 (bench/RESULTS.md fourteenth session),
    [4680, 1536] bf16: quantization 0.0053 ms with 2 warps against 0.0061 with 4, a LayerNorm +
    quantization 0.0091 against 0.0117; GELU at [4680, 8960] 0.038-0.041 ms with 4 or 8 warps, 0.075
    with 32."""
    return 8 if k >= 4096 else 2


def launch(
    x: torch.Tensor,
    mode: int = QUANT,
    mul: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    frame_of_token: torch.Tensor | None = None,
    eps: float = 0.0,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `_rows_kernel` on CUDA x in `mode`: x [M, K] (unit column stride), or for NORM with
    frame_of_token [L] x [B, L, K] with mul = scale and add = shift [B, F, K] (adaLN: 1 + scale);
    for NORM without it mul = weight, add = bias [K]. num_warps: None picks `_num_warps`
    (scripts/fp8_probe.py times the others). Returns (x8 [M, K] e4m3, scale [M, 1] fp32)."""
    x = x.reshape(-1, x.shape[-1])
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    gather = frame_of_token is not None
    if mode != NORM:
        mul = add = scale  # unread placeholders
    strides = (*mul.stride()[:2], *add.stride()[:2]) if gather else (0, 0, 0, 0)
    b0, b1, b2 = pieces(k)
    wrap_triton(_rows_kernel)[(m,)](
        x, q, scale, mul, add, frame_of_token if gather else scale, k, x.stride(0),
        frame_of_token.shape[0] if gather else 1, *strides,
        EPS=eps, MODE=mode, GATHER=gather, ONE_PLUS=gather, B0=b0, B1=b1, B2=b2,
        num_warps=num_warps or _num_warps(k),
    )  # fmt: skip
    return q, scale


def _on_cuda(x: torch.Tensor) -> bool:
    return _rows_kernel is not None and x.device.type == "cuda"


def _unit_columns(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op bodies: Triton on CUDA (allocate + launch only, so tracing yields the fake), else the
    reference."""
    if not _on_cuda(x):
        return quant_ref(x)
    check_rows("quant_e4m3", x)
    return launch(_unit_columns(x), QUANT)


def _gelu_quant(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not _on_cuda(h):
        return gelu_quant_ref(h)
    check_rows("gelu_quant_e4m3", h)
    return launch(_unit_columns(h), GELU)


def _norm_quant(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _on_cuda(x):
        return norm_quant_ref(x, weight, bias, eps)
    check_norm(x, weight, bias)
    return launch(_unit_columns(x), NORM, _unit_columns(weight), _unit_columns(bias), eps=eps)


def _modulated_norm_quant(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frame_of_token: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if not _on_cuda(x):
        return modulated_norm_quant_ref(x, shift, scale, frame_of_token, eps)
    check_modulated(x, shift, scale, frame_of_token)
    tables = (_unit_columns(scale), _unit_columns(shift))
    return launch(_unit_columns(x), NORM, *tables, frame_of_token.contiguous(), eps)


def _register(name: str, body, reference):
    """The op `ropesp::name` from body: a triton_op where triton imports, else a custom_op with a fake;
    reference is its CPU kernel."""
    qualname = f"ropesp::{name}"
    if triton is not None:
        op = torch.library.triton_op(qualname, body, mutates_args=())
    else:
        op = torch.library.custom_op(qualname, body, mutates_args=())

        @op.register_fake
        def _(x, *args):
            rows = x.numel() // x.shape[-1]
            return (
                torch.empty((rows, x.shape[-1]), dtype=torch.float8_e4m3fn, device=x.device),
                torch.empty((rows, 1), dtype=torch.float32, device=x.device),
            )

    # the CPU kernel as a plain dispatcher kernel (custom_op's register_kernel would import Dynamo on
    # first call)
    _CPU_KERNELS.impl(name, reference, "CPU")
    return op


_CPU_KERNELS = torch.library.Library("ropesp", "FRAGMENT")
quant_e4m3 = _register("quant_e4m3", _quant, quant_ref)
gelu_quant_e4m3 = _register("gelu_quant_e4m3", _gelu_quant, gelu_quant_ref)
norm_quant_e4m3 = _register("norm_quant_e4m3", _norm_quant, norm_quant_ref)
modulated_norm_quant_e4m3 = _register(
    "modulated_norm_quant_e4m3", _modulated_norm_quant, modulated_norm_quant_ref
)
