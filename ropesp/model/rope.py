"""3-D rotary position embedding with a global time index: the one home of the Causal-RoPE SP math.

Token g of a chunk whose grid is (frames, rows, cols) sits at
    time = start_frame + g // (rows*cols),  row = (g % (rows*cols)) // cols,  col = g % cols.
A sequence-parallel rank holding tokens [first_token, first_token + L) computes these positions from
(start_frame, first_token, grid) alone; tokens with g >= frames*rows*cols are SP padding and pass
through unchanged. head_dim is split into (time, rows, cols) channel groups (d-4*(d//6), 2*(d//6),
2*(d//6)); each adjacent channel pair (2j, 2j+1) is rotated by position * theta^(-2j/axis_dim).

Two formulations live here:
- `rope_apply_ref`: the upstream formulation (complex float64 table on the device, the per-token
  multiplier rebuilt and applied in float64 on every call); the baseline for parity tests and benchmarks.
- `RopeTables` + `rope_apply`: fp32 cos/sin tables precomputed once, gathered by position (training,
  benchmarks). They give exactly the values of `rope_sp_ref`, the reference of the `ropesp::rope_sp`
  operator (plugins/rope_sp.py), which computes cos/sin from the positions; `rope_for_rank` there is
  the runtime's one way to get a rank's RoPE from a `RopeGrid`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeGrid:
    """The static attributes of Causal-RoPE SP for one rank's tokens of one chunk shape (compile-time
    constants of the op and its engines; start_frame is the one runtime input)."""

    frames: int
    """Latent frames of the chunk."""
    rows: int
    """Latent rows per frame (after patching)."""
    cols: int
    """Latent columns per frame (after patching)."""
    first_token: int = 0
    """Index in the chunk of this rank's first token (0 on one rank)."""
    theta: float = 10000.0
    """RoPE base frequency."""


def axis_inv_freq(axis_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies [axis_dim/2] float64 of one axis: theta^(-2j/axis_dim)."""
    return 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)


def head_dim_split(head_dim: int) -> tuple[int, int, int]:
    """Real channels of head_dim rotated by (time, rows, cols): d-4*(d//6), 2*(d//6), 2*(d//6)."""
    d = int(head_dim)
    return (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))


def axis_angles(positions: torch.Tensor, axis_dim: int, theta: float) -> torch.Tensor:
    """Rotation angles [L, axis_dim/2] float64 of integer positions [L] along one axis."""
    inv = axis_inv_freq(axis_dim, theta).to(positions.device)
    return positions.to(torch.float64)[:, None] * inv[None, :]


def cos_sin_at(
    time: torch.Tensor, row: torch.Tensor, col: torch.Tensor, valid: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, D/2] float32 at explicit positions; padding (valid False) gets (1, 0).

    Angles are float64 before the cast, as in the tables, so both give the same fp32 values.
    """
    split = head_dim_split(head_dim)
    angles = torch.cat(
        [axis_angles(p, n, theta) for p, n in zip((time, row, col), split)], dim=-1
    )  # [L, D/2]
    v = valid[:, None]
    return torch.where(v, angles.cos().float(), 1.0), torch.where(v, angles.sin().float(), 0.0)


def token_positions(
    start_frame: torch.Tensor | int,
    first_token: int,
    length: int,
    frames: int,
    rows: int,
    cols: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(time, row, col, valid) for tokens [first_token, first_token+length), each [L] int64 / bool.

    start_frame may be a python int or an integer tensor of shape [1] (a runtime input).
    """
    g = torch.arange(first_token, first_token + length, device=device)
    hw = rows * cols
    valid = g < frames * hw
    gc = torch.where(valid, g, torch.zeros_like(g))
    if isinstance(start_frame, torch.Tensor):
        start_frame = start_frame.to(device=device, dtype=torch.int64).reshape(())
    time = gc // hw + start_frame
    row = (gc % hw) // cols
    col = gc % cols
    return time, row, col, valid


class RopeTables:
    """fp32 cos/sin tables per axis, built once: time up to max_frames, rows, cols.

    Tables are [positions, axis_dim/2] float32; angles are computed in float64 before the cast so
    the only difference from the float64 reference is the final fp32 rounding.
    """

    def __init__(
        self,
        head_dim: int,
        max_frames: int,
        max_rows: int,
        max_cols: int,
        theta: float = 10000.0,
        device: torch.device | str | None = None,
    ) -> None:
        self.split = head_dim_split(head_dim)
        self.max_frames, self.max_rows, self.max_cols = max_frames, max_rows, max_cols
        cos, sin = [], []
        for n, axis_dim in zip((max_frames, max_rows, max_cols), self.split):
            ang = axis_angles(torch.arange(n), axis_dim, theta)
            cos.append(ang.cos().float().to(device))
            sin.append(ang.sin().float().to(device))
        self.cos_t, self.cos_h, self.cos_w = cos
        self.sin_t, self.sin_h, self.sin_w = sin

    def to(self, device: torch.device | str) -> RopeTables:
        for name in ("cos_t", "cos_h", "cos_w", "sin_t", "sin_h", "sin_w"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def cos_sin(
        self, start_frame, first_token: int, length: int, frames: int, rows: int, cols: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [L, D/2] float32 for this rank's tokens; padding gets (1, 0)."""
        time, row, col, valid = token_positions(
            start_frame, first_token, length, frames, rows, cols, self.cos_t.device
        )
        cos = torch.cat([self.cos_t[time], self.cos_h[row], self.cos_w[col]], dim=-1)
        sin = torch.cat([self.sin_t[time], self.sin_h[row], self.sin_w[col]], dim=-1)
        v = valid[:, None]
        return torch.where(v, cos, torch.ones_like(cos)), torch.where(v, sin, torch.zeros_like(sin))


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] by cos/sin [L, D/2]; fp32 math, x's dtype out."""
    b, n, h, d = x.shape
    xf = x.float().reshape(b, n, h, d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.reshape(b, n, h, d).to(x.dtype)


def rope_apply(
    x: torch.Tensor,
    start_frame,
    tables: RopeTables,
    frames: int,
    rows: int,
    cols: int,
    first_token: int = 0,
) -> torch.Tensor:
    """Causal-RoPE SP with precomputed fp32 tables. x: [B, L, H, D], this rank's tokens."""
    cos, sin = tables.cos_sin(start_frame, first_token, x.shape[1], frames, rows, cols)
    return rotate_pairs(x, cos, sin)


def rope_apply_ref(
    x: torch.Tensor,
    start_frame: int,
    frames: int,
    rows: int,
    cols: int,
    theta: float = 10000.0,
    table_frames: int = 1024,
) -> torch.Tensor:
    """Upstream formulation, applied to a FULL chunk: the float64 complex table lives on the device
    (built once, as upstream builds it at model init) and every call rebuilds the per-token float64
    multiplier from it (split, expand, cat) and rotates in complex float64. Baseline only.

    x: [B, L, H, D] with L >= frames*rows*cols (extra tokens pass through).
    """
    b, _, h, d = x.shape
    table = _ref_table(d, float(theta), table_frames, str(x.device))  # [table_frames, D/2] complex128
    ft, fh, fw = table.split([a // 2 for a in head_dim_split(d)], dim=1)
    seq = frames * rows * cols
    mult = torch.cat(
        [
            ft[start_frame : start_frame + frames].view(frames, 1, 1, -1).expand(frames, rows, cols, -1),
            fh[:rows].view(1, rows, 1, -1).expand(frames, rows, cols, -1),
            fw[:cols].view(1, 1, cols, -1).expand(frames, rows, cols, -1),
        ],
        dim=-1,
    ).reshape(seq, 1, -1)
    xc = torch.view_as_complex(x[:, :seq].to(torch.float64).reshape(b, seq, h, -1, 2))
    out = torch.view_as_real(xc * mult).flatten(3)
    return torch.cat([out, x[:, seq:].to(torch.float64)], dim=1).to(x.dtype)


@functools.cache
def _ref_table(head_dim: int, theta: float, table_frames: int, device: str) -> torch.Tensor:
    """The reference's complex128 table [table_frames, head_dim/2] on device, built once per key."""
    positions = torch.arange(table_frames)
    return torch.cat(
        [
            torch.polar(
                torch.ones(table_frames, a // 2, dtype=torch.float64), axis_angles(positions, a, theta)
            )
            for a in head_dim_split(head_dim)
        ],
        dim=1,
    ).to(device)
