"""`ropesp generate --prompt-at` (a prompt schedule) and `--frames 0` (until Ctrl-C), end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from switch_reference import generate_with_switches

from ropesp.cli import main
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.settings import RunConfig
from ropesp.video import read_video_info

GRID = ["--preset", "tiny", "--latent-height", "10", "--latent-width", "14", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def embeds(tmp_path_factory, tiny_cfg):
    tmp = tmp_path_factory.mktemp("prompts")
    g = torch.Generator("cpu").manual_seed(21)
    paths = []
    for i, n in enumerate((20, 9, 14)):
        t = torch.randn(n, tiny_cfg.text_dim, generator=g) * 0.1
        torch.save(t, tmp / f"p{i}.pt")
        paths.append((str(tmp / f"p{i}.pt"), t))
    return paths


@pytest.mark.parametrize(("world_size", "mode"), [(1, "recache"), (2, "swap")])
def test_prompt_at_schedule_equals_definition(embeds, tmp_path, world_size, mode):
    (p0, e0), (p1, e1), (p2, e2) = embeds
    out = tmp_path / "l.pt"
    args = ["generate", *GRID, "--latent-frames", "12", "--prompt-embeds", p0, "--prompt-at", "1", p1]
    args += ["--prompt-at", "3", p2, "--prompt-mode", mode, "--world-size", str(world_size)]
    assert main([*args, "--output", str(tmp_path / "v.mp4"), "--latents-out", str(out)]) == 0
    res = resolve(
        RunConfig.of(preset="tiny", latent_height=10, latent_width=14, latent_frames=12, device="cpu")
    )
    executor = build_session(res).executor
    want = generate_with_switches(
        executor, res.config.sampler, res.cache, (10, 14), [3] * 4, {0: e0, 1: e1, 3: e2}, 3, mode
    )
    torch.testing.assert_close(torch.load(out), want, rtol=0, atol=1e-5)


def test_prompt_at_bad_input(embeds, tmp_path, capsys):
    (p0, _), (p1, _), _ = embeds
    base = ["generate", *GRID, "--latent-frames", "6", "--output", str(tmp_path / "v.mp4")]
    cases = [
        (
            ["--prompt-embeds", p0, "--prompt-at", "2", p1],
            "--prompt-at 2: the video has 2 chunks; a change comes at chunk 1",
        ),
        (
            ["--latent-frames", "3", "--prompt-embeds", p0, "--prompt-at", "1", p1],
            "--prompt-at 1: the video has 1 chunk; no later chunk to change the prompt at",
        ),
        (["--prompt-embeds", p0, "--prompt-at", "0", p1], "--prompt-at 0: CHUNK must be >= 1"),
        (["--prompt-embeds", p0, "--prompt-at", "x", p1], "CHUNK must be an integer"),
        (["--prompt-at", "1", p1], "--prompt-at needs --prompt TEXT or --prompt-embeds PATH"),
        (["--prompt-embeds", p0, "--prompt-at", "1", "nope.pt"], "--prompt-at 1 nope.pt does not exist"),
        (
            ["--frames", "0"],
            "an unbounded stream needs a rolling window (the KV cache would overflow): set "
            "--local-attn-frames",
        ),
    ]
    for extra, message in cases:
        argv = [*base, *extra] if "--frames" not in extra else [*base[:-4], *base[-2:], *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, (message, err)
    assert not (tmp_path / "v.mp4").exists()


def test_help_shows_the_schedule_syntax():
    proc = subprocess.run(
        [sys.executable, "-m", "ropesp.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},  # no wrapping inside the example
    )
    text = " ".join(proc.stdout.split())  # argparse wraps to the terminal width
    assert "--prompt-at CHUNK PROMPT" in text and "0: a stream until stopped" in text
    assert "--prompt 'a fox' --prompt-at 4 'the fox jumps'" in text


def test_frames_0_streams_until_ctrl_c(tmp_path):
    """An unbounded stream on a rolling window; SIGINT ends it after a chunk and the MP4 is complete."""
    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "ropesp.cli", "generate", "--preset", "tiny", "--latent-height", "8"]
    cmd += ["--latent-width", "8"]
    cmd += ["--device", "cpu", "--frames", "0", "--local-attn-frames", "7", "--sink-frames", "1"]
    proc = subprocess.Popen([*cmd, "--output", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while "streaming until Ctrl-C" not in seen and time.monotonic() < deadline:
            seen += proc.stderr.readline()
        time.sleep(3)  # a few chunks
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopping after this chunk" in err and "wrote" in err
    frames, h, w = read_video_info(out)
    assert (h, w) == (64, 64) and frames >= 9 and (frames - 9) % 12 == 0  # whole chunks: 9, then 12 each
