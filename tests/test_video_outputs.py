"""generate's outputs: a fragmented MP4 readable while it is written, PNG frames as they arrive, output
paths checked before any work, and nothing left behind (or replaced) by a failed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest

from ropesp.cli import main
from ropesp.errors import ConfigError
from ropesp.video import Mp4Writer, OutputPaths, StreamOutputs, check_outputs, read_video_info


def chunk_frames(n: int, seed: int, size: int = 64) -> np.ndarray:
    """n smooth frames [n, size, size, 3] uint8 (a moving gradient: compressible like a real video)."""
    y, x = np.mgrid[0:size, 0:size]
    frames = [
        np.stack([(x * 4 + 7 * (seed * 16 + i)) % 256, (y * 4) % 256, ((x + y) * 2) % 256], -1)
        for i in range(n)
    ]
    return np.asarray(frames, dtype=np.uint8)


def decodable_frames(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_fragmented_mp4_plays_while_it_is_written(tmp_path):
    path = tmp_path / "v.mp4"
    chunks = [chunk_frames(9, 0), chunk_frames(12, 1), chunk_frames(12, 2)]
    with Mp4Writer(path) as writer:
        writer.write(chunks[0])
        writer.write(chunks[1])
        # the writer is still open: chunk 1's keyframe closed chunk 0's fragment, which a reader decodes
        mid = decodable_frames(path)
        assert len(mid) >= 9
        err = np.abs(mid[4].astype(int) - chunks[0][4].astype(int)).mean()
        assert err < 6, f"frame 4 decoded mid-stream differs from what was written (mean |d| {err:.1f})"
        writer.write(chunks[2])
        assert len(decodable_frames(path)) >= 21
    assert read_video_info(path) == (33, 64, 64)
    data = path.read_bytes()
    assert data.count(b"moof") >= 3, "one fragment per chunk (each chunk starts with a keyframe)"


def test_check_outputs_refuses_bad_paths_naming_the_flag(tmp_path):
    (tmp_path / "base.mp4").write_bytes(b"x")
    (tmp_path / "d.mp4").mkdir()
    cases = [
        (str(tmp_path / "x.foo"), {}, "--output .*x.foo: unsupported extension '.foo'; use .mp4"),
        (str(tmp_path / "d.mp4"), {}, "--output .*d.mp4 is a directory"),
        (str(tmp_path / "base.mp4" / "x.mp4"), {}, "--output .*: .*base.mp4 is not a directory"),
        (str(tmp_path / "no" / "x.mp4"), {}, "--output .*: directory .*no does not exist"),
        (str(tmp_path / "base.mp4"), {}, "--output .*base.mp4 exists; pass --overwrite"),
        (
            str(tmp_path / "v.mp4"),
            {"latents": str(tmp_path / "l.npy")},
            "--latents-out .*unsupported extension",
        ),
        (
            str(tmp_path / "v.mp4"),
            {"frames_dir": str(tmp_path / "base.mp4")},
            "--frames-dir .*not a directory",
        ),
    ]
    if os.path.isdir("/proc"):
        cases.append(("/proc/x.mp4", {}, "--output /proc/x.mp4: cannot write in /proc"))
    for video, kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_outputs(video, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.mp4", "d.mp4"], "a check writes nothing"
    assert check_outputs(str(tmp_path / "base.mp4"), overwrite=True).video == tmp_path / "base.mp4"


def test_frames_dir_with_old_frames_needs_overwrite(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "frame_000000.png").write_bytes(b"old")
    (frames / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"--frames-dir .* already holds 1 frame_\*\.png; pass --overwrite"):
        check_outputs(str(tmp_path / "v.mp4"), frames_dir=str(frames))
    paths = check_outputs(str(tmp_path / "v.mp4"), frames_dir=str(frames), overwrite=True)
    with StreamOutputs(paths) as out:
        out.write(chunk_frames(3, 0))
        out.commit()
    assert sorted(p.name for p in frames.iterdir()) == [
        "frame_000000.png",
        "frame_000001.png",
        "frame_000002.png",
        "notes.txt",
    ]
    with av.open(str(frames / "frame_000001.png")) as png:
        decoded = next(png.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(decoded, chunk_frames(3, 0)[1]), "PNG frames are lossless"


def test_a_failed_run_leaves_no_garbage_and_keeps_the_old_video(tmp_path):
    old = tmp_path / "v.mp4"
    with Mp4Writer(old) as w:
        w.write(chunk_frames(5, 0))
    before = old.read_bytes()
    frames = tmp_path / "frames"
    paths = OutputPaths(old, tmp_path / "l.pt", frames, overwrite=True)
    with pytest.raises(RuntimeError, match="rank crashed"), StreamOutputs(paths) as out:
        out.write(chunk_frames(9, 1))
        assert out.part_path.exists() and out.part_path.parent == tmp_path
        assert len(list(frames.glob("frame_*.png"))) == 9  # written as they arrive
        raise RuntimeError("rank crashed")
    assert old.read_bytes() == before, "the earlier video is replaced only by a successful run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"], "no .part, no frames, no latents"


def test_generate_writes_frames_and_refuses_to_overwrite_before_any_work(tmp_path, capsys):
    out, frames = tmp_path / "v.mp4", tmp_path / "frames"
    small = ["generate", "--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--frames", "9"]
    assert main([*small, "--output", str(out), "--frames-dir", str(frames)]) == 0
    err = capsys.readouterr().err
    assert "playable while written" in err and f"wrote 9 PNG frames to {frames}" in err
    assert read_video_info(out) == (9, 64, 64)
    assert sorted(p.name for p in frames.iterdir()) == [f"frame_{i:06d}.png" for i in range(9)]
    before = out.read_bytes()
    t0 = time.perf_counter()
    assert main([*small, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"ropesp: error: --output {out} exists; pass --overwrite" in err
    assert "chunks" not in err and time.perf_counter() - t0 < 2, "refused before the model is built"
    assert out.read_bytes() == before
    assert main([*small, "--output", str(tmp_path / "x.foo")]) == 2
    assert "--output" in capsys.readouterr().err and not (tmp_path / "x.foo").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "v.mp4"]


def test_interrupted_generate_removes_its_partial_files(tmp_path):
    """A real run stopped by Ctrl-C after its first chunk: the old video stays, nothing else remains."""
    out = tmp_path / "v.mp4"
    with Mp4Writer(out) as w:
        w.write(chunk_frames(5, 0))
    before = out.read_bytes()
    # 33 chunks, long enough that the signal always lands mid-stream
    args = ["generate", "--preset", "tiny", "--latent-height", "16", "--latent-width", "16"]
    args += ["--frames", "393", "--max-frames", "99"]
    args += ["--output", str(out), "--overwrite", "--frames-dir", str(tmp_path / "frames")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ropesp.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "frames").glob("frame_*.png")):  # the first chunk is out
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, err
    assert out.read_bytes() == before, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"], err


def test_finished_outputs_get_the_umask_mode_not_mkstemps(tmp_path):
    """The .part files come from mkstemp (0600); the finished video and latents are 0666 less the umask,
    as any file the user's programs write."""
    import os
    import stat

    import torch

    paths = check_outputs(str(tmp_path / "v.mp4"), str(tmp_path / "l.pt"), None, False)
    old = os.umask(0o022)
    try:
        with StreamOutputs(paths) as out:
            out.write(np.zeros((9, 16, 16, 3), dtype=np.uint8))
            out.commit(torch.zeros(1))
    finally:
        os.umask(old)
    for name in ("v.mp4", "l.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
