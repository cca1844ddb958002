"""Video outputs written while the stream runs, and the rule for replacing files.

- `Mp4Writer`: a fragmented MP4 (H.264, PyAV): every chunk starts with a keyframe, so the muxer closes a
  fragment per chunk and a player (or `av.open`) can read the file while it is still being written.
- `PngFrameWriter`: one PNG per frame as frames arrive (`frame_000000.png`, ...).
- `check_outputs` / `StreamOutputs`: output paths are checked before any work (writable directory,
  supported extension, no silent overwrite); the video and latents are written to temporary files beside
  their targets and renamed only when the run succeeds, so a failed run leaves neither garbage nor a
  damaged earlier output.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from ropesp.errors import ConfigError, OutputError, arg

VIDEO_FPS = 16
FULL_DISK_BYTES = 1 << 20
"""Free space under which a failed write is reported as a full disk."""
VIDEO_SUFFIXES = (".mp4",)
LATENT_SUFFIXES = (".pt", ".pth")
FRAME_NAME = "frame_{:06d}.png"
_FRAME_RE = re.compile(r"frame_\d{6}\.png")
MP4_MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
"""empty_moov: the header goes first and carries no sample table; frag_keyframe: a fragment (moof + mdat)
is closed at every keyframe, i.e. at the start of every chunk; default_base_moof: offsets relative to each
fragment, which browsers' MSE players need."""


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [N, H, W, 3], got {frames.dtype} {frames.shape}")


def import_writer_in_background() -> None:
    """Import PyAV on a daemon thread: loading FFmpeg's libraries takes ~0.2 s of a fresh process, which
    can pass while the session loads instead of before the first chunk. A missing PyAV stays silent
    here, as does any other failure to load it: the writer's own import reports it."""

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module("av")

    threading.Thread(target=load, name="ropesp-import-av", daemon=True).start()


class Mp4Writer:
    """Append uint8 RGB frames [N, H, W, 3] chunk by chunk to a fragmented MP4.

    Each `write` call is one chunk: its first frame is encoded as an IDR keyframe, which closes the previous
    chunk's fragment. x264 runs with `tune=zerolatency` (no lookahead, no B-frames), so a frame's packet is
    muxed as soon as it is encoded and the file on disk lags the stream by at most one chunk."""

    def __init__(self, path: str | Path, fps: int = VIDEO_FPS, crf: int = 18) -> None:
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(
            str(self.path),
            mode="w",
            format="mp4",
            # flush_packets: every packet goes to the file at once, not into a 32 KiB I/O buffer
            options={"movflags": MP4_MOVFLAGS, "flush_packets": "1"},
        )
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "tune": "zerolatency", "forced-idr": "1"}
        self.frames_written = 0
        self._sized = False

    def write(self, frames: np.ndarray) -> None:
        """One chunk's frames: [N, H, W, 3] uint8 (H and W even, as yuv420p needs)."""
        import av
        from av.video.frame import PictureType

        _check_frames(frames)
        if not self._sized:
            self.stream.height, self.stream.width = frames.shape[1], frames.shape[2]
            self._sized = True
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if i == 0:
                vf.pict_type = PictureType.I  # IDR (forced-idr): a fragment boundary per chunk
            self.container.mux(self.stream.encode(vf))
            self.frames_written += 1

    def close(self) -> None:
        if self.container is None:
            return
        try:
            if self._sized:
                self.container.mux(self.stream.encode(None))  # flush the encoder
        finally:
            self.container.close()
            self.container = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def encode_png(frame: np.ndarray) -> bytes:
    """One uint8 RGB frame [H, W, 3] as PNG bytes (PyAV's PNG encoder)."""
    import av

    codec = av.CodecContext.create("png", "w")
    codec.height, codec.width = frame.shape[0], frame.shape[1]
    codec.pix_fmt = "rgb24"
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    return b"".join(bytes(p) for p in codec.encode(vf))


class PngFrameWriter:
    """Writes each frame as DIR/frame_NNNNNN.png as it arrives (numbered from 0 across chunks). Each file
    appears whole (written beside, then renamed), so a reader never sees half a PNG."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.written: list[Path] = []

    def write(self, frames: np.ndarray) -> None:
        """[N, H, W, 3] uint8."""
        _check_frames(frames)
        for frame in frames:
            path = self.directory / FRAME_NAME.format(len(self.written))
            part = path.with_name(f".{path.name}.part")
            try:
                part.write_bytes(encode_png(frame))
                os.replace(part, path)
            except BaseException:
                part.unlink(missing_ok=True)  # half a PNG is never left behind
                raise
            self.written.append(path)

    def remove(self) -> None:
        """Delete the frames this writer wrote (a failed run)."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()


# --- output paths ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputPaths:
    """The checked outputs of one generate run."""

    video: Path
    latents: Path | None = None
    frames_dir: Path | None = None
    overwrite: bool = False
    """Replace an existing video/latents file (on success only) and delete old frame_*.png in frames_dir."""


def _probe_writable(directory: Path, name: str, given: str) -> None:
    """Create and delete a file in `directory`: the one check that holds for read-only mounts, /proc and
    permissions alike (os.access says yes to root everywhere)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".ropesp-probe-")
    except OSError as exc:
        raise ConfigError(f"{arg(name, given)}: cannot write in {directory}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def _check_file(given: str, name: str, suffixes: tuple[str, ...], what: str, overwrite: bool) -> Path:
    """name: the parameter (output, latents_out), named as the caller writes it (errors.arg)."""
    path = Path(given)
    if path.suffix.lower() not in suffixes:
        raise ConfigError(
            f"{arg(name, given)}: unsupported extension {path.suffix or '(none)'!r}; use "
            f"{' or '.join(suffixes)} ({what})"
        )
    if path.is_dir():
        raise ConfigError(
            f"{arg(name, given)} is a directory; give a file path such as {path / ('out' + suffixes[0])}"
        )
    parent = path.parent
    if not parent.exists():
        raise ConfigError(f"{arg(name, given)}: directory {parent} does not exist (create it first)")
    if not parent.is_dir():
        raise ConfigError(f"{arg(name, given)}: {parent} is not a directory")
    _probe_writable(parent, name, given)
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{arg(name, given)} exists; pass {arg('overwrite')} to replace it (replaced only when the run succeeds)"
        )
    return path


def check_outputs(
    video: str, latents: str | None = None, frames_dir: str | None = None, overwrite: bool = False
) -> OutputPaths:
    """Validate a run's outputs before any work; ConfigError names the parameter as the caller wrote it
    (--output, --latents-out, --frames-dir; output=... inside errors.python_names)."""
    video_path = _check_file(video, "output", VIDEO_SUFFIXES, "fragmented MP4", overwrite)
    latents_path = None
    if latents is not None:
        latents_path = _check_file(latents, "latents_out", LATENT_SUFFIXES, "torch.save", overwrite)
        if latents_path.resolve() == video_path.resolve():
            raise ConfigError(f"{arg('latents_out', latents)} is the {arg('output')} file")
    frames_path = None
    if frames_dir is not None:
        frames_path = Path(frames_dir)
        if frames_path.exists():
            if not frames_path.is_dir():
                raise ConfigError(f"{arg('frames_dir', frames_dir)} exists and is not a directory")
            old = [p for p in frames_path.iterdir() if _FRAME_RE.fullmatch(p.name)]
            if old and not overwrite:
                raise ConfigError(
                    f"{arg('frames_dir', frames_dir)} already holds {len(old)} frame_*.png; pass "
                    f"{arg('overwrite')} to delete them first, or choose an empty directory"
                )
            _probe_writable(frames_path, "frames_dir", frames_dir)
        else:
            parent = frames_path.parent
            if not parent.is_dir():
                raise ConfigError(
                    f"{arg('frames_dir', frames_dir)}: directory {parent} does not exist (create it first)"
                )
            _probe_writable(parent, "frames_dir", frames_dir)
    return OutputPaths(video_path, latents_path, frames_path, overwrite)


def _as_created(path: Path) -> None:
    """Give a mkstemp file (mode 0600) the mode a plain open() would: 0666 less the umask, so the
    finished video is as readable as any file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


class StreamOutputs:
    """A run's outputs: the MP4 (and PNG frames) written chunk by chunk, committed on success.

        with StreamOutputs(paths) as out:      # creates VIDEO.<random>.part beside VIDEO
            for chunk in stream:
                out.write(frames)              # [N, H, W, 3] uint8
            out.commit(latents)                # renames the .part to VIDEO, saves the latents
        # leaving the block without commit(): the .part file and this run's frames are deleted

    The .part file is a fragmented MP4 that players open while it grows (its name is `part_path`)."""

    def __init__(self, paths: OutputPaths) -> None:
        self.paths = paths
        self.part_path: Path | None = None
        self._mp4: Mp4Writer | None = None
        self._frames: PngFrameWriter | None = None
        self._made_frames_dir = False
        self._committed = False

    def __enter__(self) -> StreamOutputs:
        video = self.paths.video
        fd, part = tempfile.mkstemp(dir=video.parent, prefix=f"{video.name}.", suffix=".part")
        os.close(fd)
        self.part_path = Path(part)
        _as_created(self.part_path)
        try:
            self._mp4 = Mp4Writer(self.part_path)
            frames_dir = self.paths.frames_dir
            if frames_dir is not None:
                if not frames_dir.exists():
                    frames_dir.mkdir()
                    self._made_frames_dir = True
                elif self.paths.overwrite:
                    for old in frames_dir.iterdir():
                        if _FRAME_RE.fullmatch(old.name):
                            old.unlink()
                self._frames = PngFrameWriter(frames_dir)
        except BaseException:
            self._discard()
            raise
        return self

    @property
    def frames_written(self) -> int:
        return 0 if self._mp4 is None else self._mp4.frames_written

    def write(self, frames: np.ndarray) -> None:
        """One chunk's frames [N, H, W, 3] uint8: appended to the MP4 (and written as PNGs). OutputError
        naming the output when the disk refuses (the run's outputs are then removed on exit)."""
        with _writing(self.paths.video):
            self._mp4.write(frames)
        if self._frames is not None:
            with _writing(self.paths.frames_dir):
                self._frames.write(frames)

    def commit(self, latents=None) -> None:
        """Finish the MP4 and move it (and the latents, torch.save'd beside first) into place."""
        with _writing(self.paths.video):
            self._mp4.close()
        if self.paths.latents is not None and latents is not None:
            import torch

            target = self.paths.latents
            with _writing(target):
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".part")
                os.close(fd)
                _as_created(Path(tmp))
                try:
                    torch.save(latents, tmp)
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        with _writing(self.paths.video):
            os.replace(self.part_path, self.paths.video)
        self._committed = True

    def _discard(self) -> None:
        if self._mp4 is not None:
            with contextlib.suppress(Exception):  # a half-written container may not close cleanly
                self._mp4.close()
        if self.part_path is not None:
            self.part_path.unlink(missing_ok=True)
        if self._frames is not None:
            self._frames.remove()
        if self._made_frames_dir:
            with contextlib.suppress(OSError):  # only if empty: never delete what this run did not write
                self.paths.frames_dir.rmdir()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._committed:
            self._discard()


@contextlib.contextmanager
def _writing(path: Path):
    """OutputError naming `path` for a write the disk refuses (a full disk, a vanished directory): torch's
    and FFmpeg's own errors say neither which file nor, for torch.save, why."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except RuntimeError as exc:  # torch.save's zip writer ("unexpected pos ...") on a short write
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
        why = "no space left on device" if free < FULL_DISK_BYTES else str(exc).splitlines()[0][:200]
        raise OutputError(f"cannot write {path}: {why}") from None


def read_video_info(path: str | Path) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, by decoding it."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        n = sum(1 for _ in container.decode(stream))
        return n, stream.codec_context.height, stream.codec_context.width
