"""Incremental MP4 writer (PyAV, H.264): frames are appended as chunks arrive."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import numpy as np

VIDEO_FPS = 16


class Mp4Writer:
    """Append uint8 RGB frames [N, H, W, 3]; the file is finalized on close()."""

    def __init__(self, path: str | Path, fps: int = VIDEO_FPS, crf: int = 18) -> None:
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf)}
        self.frames_written = 0
        self._sized = False

    def write(self, frames: np.ndarray) -> None:
        """frames: [N, H, W, 3] uint8 (H and W even, as yuv420p needs)."""
        import av

        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {frames.shape}")
        if not self._sized:
            self.stream.height, self.stream.width = frames.shape[1], frames.shape[2]
            self._sized = True
        for frame in frames:
            packet = self.stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            )
            self.container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        if self.container is None:
            return
        self.container.mux(self.stream.encode(None))  # flush the encoder
        self.container.close()
        self.container = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def read_video_info(path: str | Path) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, by decoding it."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        n = sum(1 for _ in container.decode(stream))
        return n, stream.codec_context.height, stream.codec_context.width
