"""The streaming decoder interface."""

from __future__ import annotations

from typing import Protocol

import torch


def to_host(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """x, contiguous on the CPU, and the event that marks its copy done (None: nothing to wait for).

    From a GPU: a non-blocking copy into pinned memory on x's device's current stream (which need not be
    the current device's: a decoder on a GPU of its own), behind the work that produces x, so the caller may queue more work before it waits on the event (a pageable `.cpu()`
    copied a 480p chunk's 10.8 MB of frames in 7.4 ms on the H200's host, 2026-11-29 trace)."""
    if x.device.type != "cuda":
        return x.contiguous(), None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(x.device))
    return host, event


def frames_to_host(frames: torch.Tensor) -> torch.Tensor:
    """Decoded frames [B, N, H, W, 3] uint8 -> the same, contiguous on the CPU, waiting for the current
    stream's copy only (the decode stream of an overlapped session), on the path to every client's
    first frame."""
    host, copied = to_host(frames)
    if copied is not None:
        copied.synchronize()
    return host


def video_frames_for(latent_frames: int) -> int:
    """Video frames a Wan-style causal decoder yields for latent_frames: 1 + 4*(F-1)."""
    return 1 + 4 * (latent_frames - 1) if latent_frames > 0 else 0


class StreamDecoder(Protocol):
    """Decodes a stream chunk by chunk; the first latent frame gives 1 video frame, later ones 4."""

    @property
    def device(self) -> torch.device | None:
        """Where it computes (an overlapped session decodes on a CUDA stream of this device); None: on
        the host, where a session's latents are."""
        ...

    def reset(self) -> None:
        """Start a new stream (clears carried state)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents: [B, F, C, h, w] float32 of one chunk -> frames [B, N, H, W, 3] uint8."""
        ...

    def fork(self) -> StreamDecoder:
        """A decoder of a new stream on the same weights (and compiled code or CUDA graphs where the
        decoder has them), with its own carried state: forks may decode chunks of their streams in
        any interleaving, each getting exactly the frames it would get alone."""
        ...
