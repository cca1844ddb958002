"""ONNX Runtime engines of the demo architecture (position embedding inside the embed segment) give the
eager latents, for a demo prompt through the CLI."""

from __future__ import annotations

import pytest
import torch

from ropesp.cli import main

pytest.importorskip("onnxruntime")

PROMPT = ["--prompt", "two blue discs bouncing", "--seed", "5"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_onnx")
    args = ["build", "--preset", "demo", "--backend", "onnx", "--device", "cpu", "--dtype", "float32"]
    assert main([*args, "--out", str(out)]) == 0
    return out


def test_ort_engines_equal_eager(engines, tmp_path):
    def run(*source: str) -> torch.Tensor:
        lat = tmp_path / f"{len(list(tmp_path.glob('*.pt')))}.pt"
        args = [
            "generate",
            *source,
            *PROMPT,
            "--output",
            str(tmp_path / "v.mp4"),
            "--latents-out",
            str(lat),
            "--overwrite",
        ]
        assert main(args) == 0
        return torch.load(lat)

    eager = run("--preset", "demo", "--device", "cpu", "--dtype", "float32")
    torch.testing.assert_close(run("--engines", str(engines)), eager, atol=1e-4, rtol=1e-4)
