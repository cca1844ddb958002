"""Engines of the shipped demo model (its position embedding inside the embed segment): ONNX Runtime
and AOTInductor packages give the eager latents and the eager score on the fixed pairs."""

from __future__ import annotations

import pytest
import torch

from ropesp.cli import main
from ropesp.demo import default_checkpoint, has_default_weights
from ropesp.demo.evaluate import eval_pairs, generate_latents, mean_score, score_pairs
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

pytestmark = pytest.mark.skipif(not has_default_weights(), reason="the demo weights are not in this tree")

PAIRS = eval_pairs()[1::8]
"""4 of the 32 evaluation pairs (tests/demo/test_model.py scores another 8 on the eager paths)."""
ATOL = 1e-4
"""float32 engine kernels against eager PyTorch, as tests/export/test_export_onnx.py / test_export_aoti.py."""
PATH_TOLERANCE = 0.02


def _generate(cfg: RunConfig) -> list[torch.Tensor]:
    with torch.no_grad():
        return generate_latents(build_session(cfg), PAIRS)


def _mean_score(latents: list[torch.Tensor]) -> float:
    return mean_score(score_pairs(latents, PAIRS))


@pytest.fixture(scope="module")
def eager():
    return _generate(RunConfig.of(checkpoint=str(default_checkpoint()), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """backend -> engines of the shipped weights, built once for this module (the ONNX ones with no model
    named: what `ropesp build` builds by default)."""
    made = {}

    def build(backend: str):
        if backend not in made:
            if backend == "onnx":
                pytest.importorskip("onnxruntime")
            out = tmp_path_factory.mktemp(f"demo_{backend}")
            source = [] if backend == "onnx" else ["--checkpoint", str(default_checkpoint())]
            args = ["build", *source, "--backend", backend]
            assert main([*args, "--device", "cpu", "--dtype", "float32", "--out", str(out)]) == 0
            made[backend] = out
        return made[backend]

    return build


@pytest.mark.parametrize("backend", ["onnx", "aoti"])
def test_engines_of_the_shipped_model_keep_latents_and_score(backend, builds, eager):
    got = _generate(RunConfig.of(engines=str(builds(backend))))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert abs(_mean_score(got) - _mean_score(eager)) <= PATH_TOLERANCE


def test_demo_prompt_through_the_cli_on_engines(builds, tmp_path):
    """The CLI path: a text prompt of the demo grammar on the ORT engines, against the CLI's eager run."""

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

    eager = run("--device", "cpu", "--dtype", "float32")  # the shipped model is the default
    torch.testing.assert_close(run("--engines", str(builds("onnx"))), eager, atol=ATOL, rtol=0)
