"""Which stream the engine steps next: pure policy over what the engine loop knows of each stream.

1. a stream that has produced nothing yet (its first frame: time to first frame is what a new
   viewer sees), oldest first;
2. with real-time pacing (realtime_fps > 0), the stream closest to its deadline: a stream that has
   produced N video frames since it opened at t0 must have chunk N+1 ready by t0 + N / fps
   (earliest deadline first);
3. otherwise the stream with the fewest chunks so far, then the one stepped longest ago (round
   robin: every stream shares the device alike).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheduled:
    """A stream the engine may step now (its consumer wants a chunk, or it may run ahead)."""

    stream: int
    chunks: int
    """Chunks produced so far."""
    video_frames: int
    """Video frames of those chunks."""
    opened: float
    """When it opened (seconds, the engine's clock)."""
    last_step: float
    """When its last chunk was stepped (0: never)."""


def deadline(s: Scheduled, fps: float) -> float:
    """When the stream's next chunk is due for real-time playback (seconds, the engine's clock)."""
    return s.opened + s.video_frames / fps


def pick(candidates: list[Scheduled], realtime_fps: float = 0.0, now: float = 0.0) -> int | None:
    """The stream to step next, or None without candidates. `now` is unused by the order itself (the
    deadlines are absolute) and kept for callers that log lateness."""
    if not candidates:
        return None
    fresh = [s for s in candidates if s.chunks == 0]
    if fresh:
        return min(fresh, key=lambda s: (s.opened, s.stream)).stream
    if realtime_fps > 0:
        return min(candidates, key=lambda s: (deadline(s, realtime_fps), s.stream)).stream
    return min(candidates, key=lambda s: (s.chunks, s.last_step, s.stream)).stream
