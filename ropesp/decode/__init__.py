"""Streaming latent decoders: each chunk's latents -> RGB frames, state carried across chunks."""

from ropesp.decode.base import StreamDecoder, video_frames_for
from ropesp.decode.preview import PreviewDecoder

__all__ = ["PreviewDecoder", "StreamDecoder", "video_frames_for"]
