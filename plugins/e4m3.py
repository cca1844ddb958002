"""e4m3 basics that the FP8 plugins share: the format's range, a tensor in e4m3 with its scales, per-head
quantization, the keys' smoothing and rotation, compiling a quantization once per shape, and the GPU check.

    plugins/fp8.py, fp8_layers.py, e4m3_rows.py   FP8 GEMMs (--precision fp8)
    plugins/attention_8bit.py, e4m3_cache.py      8-bit attention over an e4m3 KV cache (--attention fp8)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value."""


def quantize_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, L, H, D] -> (x8 [B, L, H, D] float8_e4m3fn, descale [B, H] fp32) with x ~= x8 * descale.

    One scale per (batch, head): the head's absolute maximum maps to 448 (e4m3's largest value), so
    nothing saturates and the relative rounding error is e4m3's (2^-4) above its normal range."""
    # the contiguous head_dim first, then the small [B, L, H] over L, so the pass over x stays coalesced;
    # one reduction over dims (1, 3), which straddle H, ran at about a sixth of the H200's bandwidth (the
    # quantization of q, k, v at 32760 keys took 0.79 ms); this form is not measured yet
    amax = x.abs().amax(dim=-1).amax(dim=1).float().clamp_min(1e-12)  # [B, L, H] -> [B, H]
    scale = E4M3_MAX / amax
    x8 = (x.float() * scale[:, None, :, None]).to(torch.float8_e4m3fn)  # [B, L, H, D]
    return x8, scale.reciprocal()


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """k [B, Lk, H, D] less its mean over the keys (per batch, head and channel), in fp32.

    q.(k_j - m) = q.k_j - q.m: the same shift for every key of a query row, so softmax (and attention)
    is unchanged, while the keys' shared offset, which would take most of e4m3's range under one scale
    per head, is gone. On the demo model (32 pairs, the kernel's roundings emulated in fp32 by
    scripts/fp8_attention_emulation.py): e4m3 k alone costs 0.06 of the 0.920 score, all roundings
    together score 0.816, and 0.898 with k smoothed (SageAttention smooths k the same way for INT8)."""
    k = k.float()
    return k - k.mean(dim=1, keepdim=True)


@dataclass(frozen=True)
class E4M3:
    """Keys or values in e4m3 for the fp8 kernel: data [B, L, H, D] float8_e4m3fn, descale [B, H] fp32,
    for values their offset [B, H, D] fp32 (None: none), for keys the rotation [D, D] they were stored
    under (None: none; incoherent_rotation): the value is data * descale @ rotation^T + offset. Keys are
    less an offset too, one that attention does not see (it moves a query's scores alike), so theirs is
    not carried."""

    data: torch.Tensor
    descale: torch.Tensor
    offset: torch.Tensor | None = None
    rotation: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """[B, L, H, D] fp32, rotated back."""
        x = self.data.float() * self.descale[:, None, :, None]
        if self.rotation is not None:
            x = x @ self.rotation.T
        return x if self.offset is None else x + self.offset[:, None]


ROTATION_SEED = 0
"""Seed of incoherent_rotation's signs: one matrix for every stream, layer and head."""


def incoherent_rotation(head_dim: int, device: torch.device | str) -> torch.Tensor | None:
    """R [head_dim, head_dim] fp32 on device, orthogonal: diag(random signs) times the Sylvester Hadamard
    matrix / sqrt(head_dim) (FlashAttention-3's "incoherent processing"); None where head_dim is not a
    power of two. q and k rotated alike give the same scores, (qR).(kR) = q.k, with each head's large
    channels spread over all of them before e4m3 rounds them."""
    if head_dim & (head_dim - 1):
        return None
    return _rotation(head_dim, str(torch.device(device))).clone()


@functools.cache
def _rotation(head_dim: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    g = torch.Generator().manual_seed(ROTATION_SEED)
    signs = torch.randint(0, 2, (head_dim,), generator=g) * 2.0 - 1.0
    return (signs[:, None] * h / head_dim**0.5).to(device)


def rotated(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [..., D] @ rotation [D, D], in fp32."""
    return x.float() @ rotation


@functools.cache
def _compiled(fn):
    # one reduction and one cast kernel per tensor (eager takes several passes), specialized to each
    # shape (a process meets a few: the chunk's tokens per rank, its all-to-all blocks): with dynamic
    # shapes the cache writes' casts ran ~6x slower than their bytes allow on an H200, and q's amax 3x
    return torch.compile(fn, dynamic=False, fullgraph=True)


def compiled(fn, x: torch.Tensor):
    """fn compiled (once per function) where x is on CUDA; fn itself elsewhere."""
    return _compiled(fn) if x.is_cuda else fn


def gpu_capability_reason(device: torch.device | str, need: tuple[int, int], what: str) -> str | None:
    """Why device is not a CUDA GPU of compute capability >= need (None when it is); `what` names the
    hardware that needs it in the message (e.g. "FP8 tensor cores need")."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it needs a CUDA GPU of compute capability >= {need[0]}.{need[1]}, and the device is {device.type}"
    if not torch.cuda.is_available():
        return f"it needs a CUDA GPU of compute capability >= {need[0]}.{need[1]}, and this torch sees none"
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {cap[0]}.{cap[1]}; {what} >= {need[0]}.{need[1]}"
    return None
