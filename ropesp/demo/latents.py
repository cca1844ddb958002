"""The demo's latent space: the one the preview decoder defines (ropesp/decode/preview.py).

The preview decoder maps each latent pixel z [16] to rgb = z @ C + b (C: its fixed 16x3 coefficients,
b: its bias), repeats it 8x8 and interpolates linearly in time (latent frame 0 -> video frame 0, latent
frame k -> video frames 4k-3 .. 4k, the last of which is rgb(k) exactly). Encoding inverts that:
video frames 0, 4, 8, ... at 1/8 resolution (the mean of each 8x8 block) -> the minimum-norm latent of
each pixel, z = C (C^T C)^-1 (rgb - b). For a video the decoder can produce (every procedural world video
is one), decode(encode(video)) gives the same uint8 frames back.
"""

from __future__ import annotations

import functools

import torch

from ropesp.config import VAE_STRIDE
from ropesp.decode.preview import WAN21_LATENT_RGB, WAN21_LATENT_RGB_BIAS

LATENT_CHANNELS = len(WAN21_LATENT_RGB)


@functools.cache
def _encoder_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """(P [3, 16], bias [3]) float64 with z = (rgb - bias) @ P the minimum-norm solution of z @ C = rgb - bias."""
    coeff = torch.tensor(WAN21_LATENT_RGB, dtype=torch.float64)  # [16, 3]
    bias = torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=torch.float64)
    return torch.linalg.pinv(coeff), bias  # pinv: [3, 16]


def rgb_to_latents(rgb: torch.Tensor) -> torch.Tensor:
    """rgb [..., h, w, 3] in [-1, 1] at latent resolution -> latents [..., 16, h, w] float32."""
    pinv, bias = _encoder_matrix()
    z = (rgb.double() - bias.to(rgb.device)) @ pinv.to(rgb.device)  # [..., h, w, 16]
    return z.movedim(-1, -3).float().contiguous()


def uint8_to_rgb(frames: torch.Tensor) -> torch.Tensor:
    """[0, 255] levels (uint8, or float64 block means) -> float64 [-1, 1], the inverse of the decoder's
    quantization. float64 keeps whole levels exact, so equal images give bit-equal latents."""
    return frames.double() / 127.5 - 1.0


def encode_video(frames: torch.Tensor) -> torch.Tensor:
    """Video frames [N, H, W, 3] uint8 (N = 4F - 3, H and W multiples of 8) -> latents [1, F, 16, H/8, W/8].

    Only frames 0, 4, 8, ... are read (the decoder interpolates the others); each 8x8 block's mean is the
    least-squares fit of a nearest-neighbour upscale."""
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    n, height, width, _ = frames.shape
    t, s = VAE_STRIDE[0], VAE_STRIDE[1]
    if (n - 1) % t:
        raise ValueError(f"frames: {n} frames; expected 4*k + 1 (k latent frames after the first)")
    if height % s or width % s:
        raise ValueError(f"frames: {height}x{width} pixels; both must be multiples of {s}")
    key = frames[::t]  # [F, H, W, 3]
    f = key.shape[0]
    # integer block sums: a block of equal levels gives that level exactly
    sums = key.view(f, height // s, s, width // s, s, 3).to(torch.int64).sum(dim=(2, 4))  # [F, h, w, 3]
    return rgb_to_latents(uint8_to_rgb(sums.double() / (s * s))).unsqueeze(0)
