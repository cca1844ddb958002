"""The fast Wan VAE decoder's elementwise passes (ropesp/decode/wan_fast.py), each one read of its inputs
and one write straight into the buffer the next convolution reads:

    norm_silu_into(x, res, norm, dst, sum_out, bias)   s = x (+ bias) (+ res); dst <- SiLU(RMS_norm(s))
                                                       (or s itself)
    upsample_into(x, res, split, dst, bias)            nearest 2x of x (+ bias) (+ res), frames
                                                       interleaved, into dst

x, res: [B, C, T, H, W] activations; bias: [C] (a convolution's, which cuDNN would add in a pass of its
own: PyTorch adds a convolution's bias after cuDNN's kernel); dst: a view of a padded convolution input (any strides, channels
unit-stride on CUDA). On CUDA they run as Triton kernels over channels-last rows (one pixel's C channels
a row); elsewhere, and wherever Triton is absent, as the torch ops of diffusers' WanResidualBlock /
WanResample, so a CPU decode gives diffusers' values bit for bit (tests/decode).

Rounding on CUDA: the norm, scale, gamma and SiLU in fp32, one rounding to the activations' dtype at the
end (diffusers rounds after the normalization, the scale, the gamma and the SiLU: four bf16 roundings),
so the fused pass is at least as close to fp32 as eager bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

NORM_EPS = 1e-12
"""F.normalize's default eps: the norm is x / max(||x||, eps)."""


def channels_last_rows(x: torch.Tensor) -> bool:
    """Whether x [B, C, T, H, W] is dense channels-last (rows of C contiguous channels, one per pixel)."""
    return x.permute(0, 2, 3, 4, 1).is_contiguous()


def use_kernels(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# --- references: diffusers' ops, in its order ---------------------------------------------------
def _biased(x, bias):
    return x if bias is None else x + bias.view(1, -1, *([1] * (x.dim() - 2)))


def norm_silu_ref(x, res, norm, dst, sum_out: bool, bias=None):
    """s = x (+ bias) + res (res None: x); dst.copy_(SiLU(norm(s))) (norm None: dst.copy_(s)). Returns
    s if sum_out else None. norm: the WanRMS_norm module (called as diffusers calls it)."""
    x = _biased(x, bias)
    s = x if res is None else x + res
    dst.copy_(s if norm is None else F.silu(norm(s)))
    return s if sum_out else None


def upsample_ref(x, res, split: int, dst, bias=None):
    """dst [B * T * split, C, 2H, 2W] <- nearest 2x of x (+ res) [B, split * C, T, H, W], as
    WanResample: the split channel halves become consecutive frames (its time upsampling), then every
    frame is upsampled in fp32 ("nearest-exact" at factor 2 repeats each pixel)."""
    x = _biased(x, bias)
    s = x if res is None else x + res
    b, c, t, h, w = s.shape
    if split == 2:
        s = s.reshape(b, 2, c // 2, t, h, w)
        s = torch.stack((s[:, 0], s[:, 1]), 3).reshape(b, c // 2, t * 2, h, w)
        c, t = c // 2, t * 2
    frames = s.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    up = F.interpolate(frames.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(frames)
    dst.copy_(up)


if triton is not None:

    @triton.jit
    def _norm_silu_kernel(
        X,  # [R, C] rows, dense
        BIAS,  # [C] (HAS_BIAS)
        RES,  # [R, C] rows (HAS_RES)
        GAMMA,  # [C] (NORM)
        DST,  # dst's first element; row (b, t, h, w) at b * d_b + t * d_t + h * d_h + w * d_w
        SUM,  # [R, C] rows (WRITE_SUM)
        n_rows,
        C,
        T,
        H,
        W,
        d_b,
        d_t,
        d_h,
        d_w,
        scale,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        WRITE_SUM: tl.constexpr,
        NORM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(BIAS + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            x += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        if WRITE_SUM:
            s = x.to(SUM.dtype.element_ty)
            tl.store(SUM + offs, s, mask=mask)
            x = s.to(tl.float32)  # what later layers read: normalize the stored value
        if NORM:
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
            g = tl.load(GAMMA + cols, mask=cols < C, other=0.0).to(tl.float32) * scale
            x = x * inv[:, None] * g[None, :]
            x = x * tl.sigmoid(x)
        w = rows % W
        h = (rows // W) % H
        t = (rows // (W * H)) % T
        b = rows // (W * H * T)
        at = b * d_b + t * d_t + h * d_h + w * d_w
        tl.store(DST + at[:, None] + cols[None, :], x.to(DST.dtype.element_ty), mask=mask)

    @triton.jit
    def _upsample_kernel(
        X,  # [R, SPLIT * C] rows, dense: pixel (b, t, h, w) of the input
        BIAS,  # [SPLIT * C] (HAS_BIAS)
        RES,  # as X (HAS_RES)
        DST,  # interior of the padded frames: frame f, row y, column x at f * d_f + y * d_h + x * d_w
        n_rows,
        C,
        T,
        H,
        W,
        d_f,
        d_h,
        d_w,
        SPLIT: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_RES: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        half = tl.program_id(1)  # which channel half (frame of the time upsampling)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
        offs = rows[:, None] * (SPLIT * C) + half * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(BIAS + half * C + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
        if HAS_RES:
            x += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        w = rows % W
        h = (rows // W) % H
        bt = rows // (W * H)  # b * T + t
        at = (bt * SPLIT + half) * d_f + (2 * h) * d_h + (2 * w) * d_w
        ptr = DST + at[:, None] + cols[None, :]
        x = x.to(DST.dtype.element_ty)
        tl.store(ptr, x, mask=mask)
        tl.store(ptr + d_w, x, mask=mask)
        tl.store(ptr + d_h, x, mask=mask)
        tl.store(ptr + d_h + d_w, x, mask=mask)


def _block(c: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): the channels padded to a power of two, ~4096 values a program."""
    block_c = triton.next_power_of_2(c)
    return max(1, 4096 // block_c), block_c, 4


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, T, H, W] as dense channels-last rows (a copy only where it is not already)."""
    return x if channels_last_rows(x) else x.contiguous(memory_format=torch.channels_last_3d)


def norm_silu_into(
    x: torch.Tensor,
    res: torch.Tensor | None,
    norm: torch.nn.Module | None,
    dst: torch.Tensor,
    sum_out: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """s = x (+ bias [C]) + res (res None: x) [B, C, T, H, W]; dst [B, C, T, H, W] (a view) <-
    SiLU(norm(s)), or s where norm is None. Returns s when sum_out (channels-last on CUDA), else None."""
    assert dst.shape == x.shape and (res is None or res.shape == x.shape), (x.shape, dst.shape)
    if not use_kernels(x):
        return norm_silu_ref(x, res, norm, dst, sum_out, bias)
    assert dst.stride(1) == 1, "dst must hold channels unit-stride"
    x = _rows(x)
    res = None if res is None else _rows(res)
    b, c, t, h, w = x.shape
    out = torch.empty_like(x) if sum_out else None
    gamma = norm.gamma.reshape(c) if norm is not None else x
    if norm is not None:
        assert isinstance(norm.bias, float) and norm.bias == 0.0, "RMS norm with a bias"
    n_rows = b * t * h * w
    block_r, block_c, warps = _block(c)
    _norm_silu_kernel[(triton.cdiv(n_rows, block_r),)](
        x, bias if bias is not None else x, res if res is not None else x, gamma, dst,
        out if out is not None else x,
        n_rows, c, t, h, w, dst.stride(0), dst.stride(2), dst.stride(3), dst.stride(4),
        float(norm.scale) if norm is not None else 1.0,
        HAS_BIAS=bias is not None, HAS_RES=res is not None, WRITE_SUM=sum_out, NORM=norm is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return out


def upsample_into(
    x: torch.Tensor,
    res: torch.Tensor | None,
    split: int,
    dst: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> None:
    """dst [B * T * split, C, 2H, 2W] (the interior of padded frames) <- nearest 2x of x (+ bias
    [split * C]) (+ res) [B, split * C, T, H, W]; split 2: channel half j of input frame t becomes frame 2t + j (the time
    upsampling of WanResample's upsample3d)."""
    b, c2, t, h, w = x.shape
    c = c2 // split
    assert dst.shape == (b * t * split, c, 2 * h, 2 * w), (x.shape, dst.shape)
    if not use_kernels(x):
        upsample_ref(x, res, split, dst, bias)
        return
    assert dst.stride(1) == 1, "dst must hold channels unit-stride"
    x = _rows(x)
    res = None if res is None else _rows(res)
    n_rows = b * t * h * w
    block_r, block_c, warps = _block(c)
    _upsample_kernel[(triton.cdiv(n_rows, block_r), split)](
        x, bias if bias is not None else x, res if res is not None else x, dst, n_rows, c, t, h, w,
        dst.stride(0), dst.stride(2), dst.stride(3), SPLIT=split, HAS_BIAS=bias is not None,
        HAS_RES=res is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=warps,
    )  # fmt: skip
