"""`ropesp generate --prompt TEXT` on the demo architecture uses the demo encoder (no download)."""

from __future__ import annotations

import subprocess
import sys

import torch


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ropesp.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_demo_prompt_needs_no_text_encoder(tmp_path):
    lat = tmp_path / "l.pt"
    args = ["generate", "--preset", "demo", "--output", str(tmp_path / "v.mp4"), "--latents-out", str(lat)]
    proc = run_cli(*args, "--prompt", "two blue discs bouncing")
    assert proc.returncode == 0, proc.stderr
    assert "prompt 'two blue discs bouncing' (demo encoder)" in proc.stderr
    assert torch.load(lat).shape == (1, 9, 16, 24, 24)


def test_unknown_word_is_a_clear_error(tmp_path):
    out = tmp_path / "v.mp4"
    proc = run_cli(
        "generate", "--preset", "demo", "--prompt", "a purple square moving right", "--output", str(out)
    )
    assert proc.returncode == 2
    assert "ropesp: error: prompt 'a purple square moving right': unknown word 'purple'" in proc.stderr
    assert "the demo model knows: a, an, one, two, three, red, green" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_wrong_grid_for_the_position_embedding_is_refused(tmp_path):
    out = tmp_path / "v.mp4"
    proc = run_cli("generate", "--preset", "demo", "--latent-height", "16", "--output", str(out))
    assert proc.returncode == 2
    assert "position embedding is for a 192 x 192 video (24 x 24 latents)" in proc.stderr and not out.exists()
