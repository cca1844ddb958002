"""Engines of the shipped demo model (its position embedding inside the embed segment): ONNX Runtime
and AOTInductor packages give the eager latents and the eager score on the fixed pairs."""

from __future__ import annotations

import pytest
import torch

from ropesp.cli import main
from ropesp.demo import DemoTextEncoder, default_checkpoint, has_default_weights
from ropesp.demo.evaluate import eval_pairs
from ropesp.demo.prompts import parse
from ropesp.demo.score import score_latents
from ropesp.runtime.pipeline import PipelineConfig, build_session

pytestmark = pytest.mark.skipif(not has_default_weights(), reason="the demo weights are not in this tree")

PAIRS = eval_pairs()[1::8]
"""4 of the 32 evaluation pairs (tests/demo/test_model.py scores another 8 on the eager paths)."""
ATOL = 1e-4
"""float32 engine kernels against eager PyTorch, as tests/export/test_export_onnx.py / test_export_aoti.py."""
PATH_TOLERANCE = 0.02


def _generate(cfg: PipelineConfig) -> list[torch.Tensor]:
    session = build_session(cfg)
    encoder = DemoTextEncoder()
    out = []
    with torch.no_grad():
        for prompt, seed in PAIRS:
            session.reset(encoder.encode(prompt), seed)
            out.append(session.generate())
    return out


def _mean_score(latents: list[torch.Tensor]) -> float:
    return sum(score_latents(x, parse(p)).score for x, (p, _) in zip(latents, PAIRS)) / len(PAIRS)


@pytest.fixture(scope="module")
def eager():
    return _generate(PipelineConfig(checkpoint=str(default_checkpoint()), device="cpu", dtype="float32"))


@pytest.mark.parametrize("backend", ["onnx", "aoti"])
def test_engines_of_the_shipped_model_keep_latents_and_score(backend, eager, tmp_path):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / backend
    args = ["build", "--checkpoint", str(default_checkpoint()), "--backend", backend, "--device", "cpu"]
    assert main([*args, "--dtype", "float32", "--out", str(out)]) == 0
    got = _generate(PipelineConfig(engines=str(out)))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert abs(_mean_score(got) - _mean_score(eager)) <= PATH_TOLERANCE


def test_demo_prompt_through_the_cli_on_engines(tmp_path):
    """The CLI path: a text prompt of the demo grammar on ORT engines of the demo architecture."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx"
    args = ["build", "--preset", "demo", "--backend", "onnx", "--device", "cpu", "--dtype", "float32"]
    assert main([*args, "--out", str(out)]) == 0

    def run(*source: str) -> torch.Tensor:
        lat = tmp_path / f"{len(list(tmp_path.glob('*.pt')))}.pt"
        prompt = ["--prompt", "two blue discs bouncing", "--seed", "5", "--overwrite"]
        assert (
            main(
                ["generate", *source, *prompt, "--output", str(tmp_path / "v.mp4"), "--latents-out", str(lat)]
            )
            == 0
        )
        return torch.load(lat)

    eager = run("--preset", "demo", "--device", "cpu", "--dtype", "float32")
    torch.testing.assert_close(run("--engines", str(out)), eager, atol=ATOL, rtol=0)
