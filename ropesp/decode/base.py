"""The streaming decoder interface."""

from __future__ import annotations

from typing import Protocol

import torch


def video_frames_for(latent_frames: int) -> int:
    """Video frames a Wan-style causal decoder yields for latent_frames: 1 + 4*(F-1)."""
    return 1 + 4 * (latent_frames - 1) if latent_frames > 0 else 0


class StreamDecoder(Protocol):
    """Decodes a stream chunk by chunk; the first latent frame gives 1 video frame, later ones 4."""

    def reset(self) -> None:
        """Start a new stream (clears carried state)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, F, C, h, w] float32 of one chunk -> frames [B, N, H, W, 3] uint8."""
        ...
