"""Causal-RoPE SP operator `ropesp::rope_sp`. x: [B, L, H, D]; start_frame: int32 [1]. Contract: docs/ARCHITECTURE.md.

    rope_sp(x, start_frame, frames, rows, cols, first_token, theta) -> same shape and dtype as x

x holds this rank's L tokens, global indices [first_token, first_token + L) of a chunk whose latent
grid is (frames, rows, cols); start_frame is the chunk's absolute latent-frame index, a runtime
tensor so one compiled engine serves every chunk. Tokens past frames*rows*cols are SP padding and
pass through unchanged. The math (positions, head_dim split, pair rotation) is ropesp.model.rope's.

Forms: `rope_sp_ref` (pure torch, the CPU kernel), `_rope_sp_kernel` (Triton, CUDA; also compiled
ahead of time into TensorRT engines by plugins/rope_sp_trt.py) and the op itself: a
`torch.library.triton_op` where triton imports (torch.export keeps it as one node, AOTInductor
compiles the kernel in), else an opaque `custom_op` with a fake implementation.
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from ropesp.model.rope import RopeGrid, cos_sin_at, head_dim_split, rotate_pairs, token_positions

try:  # CPU-only torch wheels come without triton; the op then falls back to the reference
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:
    triton = None

OP_NAME = "ropesp::rope_sp"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Launch shape, measured on an H100 at Wan-1.3B's rank shape [1, 2340, 12, 128] bf16: 8.8 us against
# 3.2 us for a plain copy of the same bytes; larger tiles were up to 10x slower (scripts/bench_rope.py).
BLOCK_L = 4  # tokens per program
BLOCK_H = 1  # heads per step of the program's loop over heads
NUM_WARPS = 8


def check_args(x, start_frame, frames: int, rows: int, cols: int, first_token: int, theta: float) -> None:
    """Raise ValueError naming the bad argument and the accepted range."""
    if x.dim() != 4:
        raise ValueError(f"rope_sp: x must be [B, L, H, D], got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise ValueError(f"rope_sp: x has dtype {x.dtype}; accepted: {DTYPES}")
    d = x.shape[-1]
    if d % 2 or d < 6:
        raise ValueError(f"rope_sp: head_dim {d} must be even and >= 6 (split into time/rows/cols pairs)")
    if (
        not isinstance(start_frame, torch.Tensor)
        or start_frame.dtype != torch.int32
        or start_frame.numel() != 1
    ):
        got = (
            (start_frame.dtype, tuple(start_frame.shape))
            if isinstance(start_frame, torch.Tensor)
            else start_frame
        )
        raise ValueError(f"rope_sp: start_frame must be an int32 tensor of shape [1], got {got}")
    if min(frames, rows, cols) < 1:
        raise ValueError(f"rope_sp: grid (frames, rows, cols) = {(frames, rows, cols)} must be >= 1 each")
    if first_token < 0:
        raise ValueError(f"rope_sp: first_token {first_token} must be >= 0")
    if not theta > 0:
        raise ValueError(f"rope_sp: theta {theta} must be > 0")


def rope_sp_ref(
    x: torch.Tensor,
    start_frame: torch.Tensor,
    frames: int,
    rows: int,
    cols: int,
    first_token: int,
    theta: float,
) -> torch.Tensor:
    """Reference (pure torch, any device). x: [B, L, H, D] fp32/fp16/bf16; start_frame: int32 [1].

    fp32 math, output in x's dtype; equals ropesp.model.rope.rope_apply with RopeTables exactly.
    """
    check_args(x, start_frame, frames, rows, cols, first_token, theta)
    return rotate_pairs(x, *_cos_sin(RopeGrid(frames, rows, cols, first_token, theta), start_frame, x))


def _cos_sin(grid: RopeGrid, start_frame: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, D/2] float32 of x's L tokens (x: [B, L, H, D]); padding gets (1, 0)."""
    g = grid
    positions = token_positions(start_frame, g.first_token, x.shape[1], g.frames, g.rows, g.cols, x.device)
    return cos_sin_at(*positions, x.shape[-1], g.theta)


if triton is not None:

    @triton.jit  # parameters in TensorRT AOT order: inputs, int32 scalars, outputs; then constexprs
    def _rope_sp_kernel(
        X,  # x [B, L, H, D], contiguous
        START,  # start_frame, int32 [1]
        n_tokens,  # L
        n_heads,  # H
        Y,  # out [B, L, H, D], x's dtype
        FRAMES: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        FIRST_TOKEN: tl.constexpr,
        THETA: tl.constexpr,
        T_DIM: tl.constexpr,
        H_DIM: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """Program (token block, batch): cos/sin [BLOCK_L, D/2] once, then all heads, BLOCK_H at a time.

        No tables: turns = pos * theta^(-2k/axis_dim) / (2 pi) in float64, reduced to [-1/2, 1/2]
        (exact in float64), times 2 pi, then fp32 libdevice sin/cos of an angle in [-pi, pi]. That
        keeps fp32 accuracy (a few ulp of the float64 reference) for any start_frame and needs no
        table input, which the TensorRT AOT plugin could not carry.
        """
        tok = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL] local token index
        pair = tl.arange(0, BLOCK_P)  # [BP] channel pair j: channels 2j, 2j+1
        hw: tl.constexpr = ROWS * COLS
        g = FIRST_TOKEN + tok  # global token index in the chunk
        valid = g < FRAMES * hw  # False: SP padding, passes through (cos 1, sin 0)
        time = tl.load(START) + g // hw
        row = (g % hw) // COLS
        col = g % COLS

        in_t = 2 * pair < T_DIM
        in_h = (2 * pair >= T_DIM) & (2 * pair < T_DIM + H_DIM)
        # 2k: the pair's first channel within its axis
        k2 = tl.where(in_t, 2 * pair, tl.where(in_h, 2 * pair - T_DIM, 2 * pair - T_DIM - H_DIM))
        axis_dim = tl.where(in_t, T_DIM, tl.where(in_h, H_DIM, HEAD_DIM - T_DIM - H_DIM))
        two_pi = tl.full([BLOCK_P], 6.283185307179586, tl.float64)
        log2_theta = libdevice.log2(tl.full([BLOCK_P], THETA, tl.float64))
        inv_turns = libdevice.exp2(-(k2.to(tl.float64) / axis_dim.to(tl.float64)) * log2_theta) / two_pi

        pos = tl.where(in_t[None, :], time[:, None], tl.where(in_h[None, :], row[:, None], col[:, None]))
        turns = pos.to(tl.float64) * inv_turns[None, :]  # [BL, BP]
        angle = ((turns - tl.floor(turns + 0.5)) * two_pi[None, :]).to(tl.float32)
        cos = tl.where(valid[:, None], libdevice.cos(angle), 1.0)[:, None, :]  # [BL, 1, BP]
        sin = tl.where(valid[:, None], libdevice.sin(angle), 0.0)[:, None, :]

        base = tl.program_id(1).to(tl.int64) * n_tokens * n_heads * HEAD_DIM
        tok_mask = (tok < n_tokens)[:, None, None] & (pair < HEAD_DIM // 2)[None, None, :]
        for h0 in range(0, n_heads, BLOCK_H):  # cos/sin are reused by every head
            head = h0 + tl.arange(0, BLOCK_H)  # [BH]
            even = (tok[:, None, None] * n_heads + head[None, :, None]) * HEAD_DIM + 2 * pair[None, None, :]
            mask = tok_mask & (head < n_heads)[None, :, None]
            x0 = tl.load(X + base + even, mask=mask, other=0.0).to(tl.float32)  # [BL, BH, BP] channels 2j
            x1 = tl.load(X + base + even + 1, mask=mask, other=0.0).to(tl.float32)  # channels 2j+1
            tl.store(Y + base + even, (x0 * cos - x1 * sin).to(Y.dtype.element_ty), mask=mask)
            tl.store(Y + base + even + 1, (x0 * sin + x1 * cos).to(Y.dtype.element_ty), mask=mask)

else:
    _rope_sp_kernel = None


def kernel_constexprs(frames: int, rows: int, cols: int, first_token: int, theta: float, head_dim: int):
    """Compile-time parameters of `_rope_sp_kernel` (shared by the torch op and the TensorRT AOT plugin)."""
    t_dim, h_dim, _ = head_dim_split(head_dim)
    return {
        "FRAMES": frames, "ROWS": rows, "COLS": cols, "FIRST_TOKEN": first_token, "THETA": float(theta),
        "T_DIM": t_dim, "H_DIM": h_dim, "HEAD_DIM": head_dim,
        "BLOCK_L": BLOCK_L, "BLOCK_H": BLOCK_H, "BLOCK_P": 1 << (head_dim // 2 - 1).bit_length(),
    }  # fmt: skip


def _rope_sp(
    x: torch.Tensor,
    start_frame: torch.Tensor,
    frames: int,
    rows: int,
    cols: int,
    first_token: int,
    theta: float,
) -> torch.Tensor:
    """The op body: Triton on CUDA (allocate + launch only, so tracing yields the fake), else the reference."""
    check_args(x, start_frame, frames, rows, cols, first_token, theta)
    if start_frame.device != x.device:
        raise ValueError(f"rope_sp: start_frame is on {start_frame.device} but x is on {x.device}")
    if _rope_sp_kernel is None or x.device.type != "cuda":
        return rope_sp_ref(x, start_frame, frames, rows, cols, first_token, theta)
    b, length, heads, head_dim = x.shape
    head_dim = int(head_dim)  # a compile-time constant of the kernel
    x = x.contiguous()
    y = torch.empty_like(x)
    meta = kernel_constexprs(frames, rows, cols, first_token, theta, head_dim)
    grid = (triton.cdiv(length, meta["BLOCK_L"]), b)
    wrap_triton(_rope_sp_kernel)[grid](x, start_frame, length, heads, y, **meta, num_warps=NUM_WARPS)
    return y


if triton is not None:
    rope_sp = torch.library.triton_op(OP_NAME, _rope_sp, mutates_args=())
else:
    rope_sp = torch.library.custom_op(OP_NAME, _rope_sp, mutates_args=())

    @rope_sp.register_fake
    def _(x, start_frame, frames, rows, cols, first_token, theta):
        check_args(x, start_frame, frames, rows, cols, first_token, theta)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# the reference serves the CPU and CI path, as a plain dispatcher kernel: custom_op's register_kernel wraps
# every kernel in torch._disable_dynamo, whose first call imports Dynamo, sympy and Inductor (0.9 s of a
# CPU engines process's start, where AOTInductor's proxy executor calls this op)
_CPU_KERNELS = torch.library.Library(OP_NAME.split("::")[0], "FRAGMENT")
_CPU_KERNELS.impl(OP_NAME.split("::")[1], rope_sp_ref, "CPU")


def rope_for_rank(grid: RopeGrid, start_frame: torch.Tensor | int, *, op: bool = True):
    """x [B, L, H, D] -> rotated x of this rank's tokens, the static attributes bound from grid.

    op: through `torch.ops.ropesp.rope_sp` (the Triton kernel on CUDA; one node for torch.export and one
    graph for torch.compile at every chunk position); else the reference math directly, with cos/sin
    computed once per token count (q and k of every layer share positions).
    start_frame: int32 [1] tensor (a runtime input; its value may change between calls) or an int.
    """
    if isinstance(start_frame, int):
        start_frame = torch.tensor([start_frame], dtype=torch.int32)
    if start_frame.dtype != torch.int32 or start_frame.numel() != 1:
        raise ValueError(
            f"start_frame must be an int32 tensor of shape [1], got {start_frame.dtype} {tuple(start_frame.shape)}"
        )
    g = grid
    if op:
        rope_op = torch.ops.ropesp.rope_sp

        def rope(x: torch.Tensor) -> torch.Tensor:
            sf = start_frame if start_frame.device == x.device else start_frame.to(x.device)
            return rope_op(x, sf, g.frames, g.rows, g.cols, g.first_token, float(g.theta))

        return rope
    cos_sin: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rope_ref(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n not in cos_sin:
            check_args(x, start_frame, g.frames, g.rows, g.cols, g.first_token, g.theta)
            cos_sin[n] = _cos_sin(g, start_frame, x)  # [L, D/2] each
        return rotate_pairs(x, *cos_sin[n])

    return rope_ref
