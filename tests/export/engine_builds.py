"""Helpers of the export tests (conftest.py builds the shared engine directories with them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ropesp.cli import main

GRID = ["--latent-height", "10", "--latent-width", "14"]
FRAMES = ["--latent-frames", "6"]
SEED = ["--seed", "3"]


def run_generate(tmp_path: Path, *args: str) -> torch.Tensor:
    """`ropesp generate ... --latents-out` in this process (spawned ranks for --world-size 2)."""
    out = tmp_path / f"latents-{len(list(tmp_path.glob('latents-*')))}.pt"
    outputs = ["--output", str(tmp_path / "v.mp4"), "--latents-out", str(out), "--overwrite"]
    code = main(["generate", *SEED, *outputs, *args])
    assert code == 0
    return torch.load(out)


class Builds:
    """`ropesp build` through the CLI, once per (backend, world size) for the whole session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dirs: dict[tuple[str, int], Path] = {}

    def __call__(self, backend: str, world_size: int) -> Path:
        key = (backend, world_size)
        if key not in self.dirs:
            out = self.root / f"{backend}-ws{world_size}"
            args = ["build", "--preset", "tiny", *GRID, "--max-frames", "6", "--world-size", str(world_size)]
            assert main([*args, "--backend", backend, "--dtype", "float32", "--out", str(out)]) == 0
            self.dirs[key] = out
        return self.dirs[key]

    def copy(self, backend: str, world_size: int, dest: Path) -> Path:
        """A private copy to corrupt."""
        return Path(shutil.copytree(self(backend, world_size), dest))
