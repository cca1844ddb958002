"""The shipped demo model on the GPU paths: bf16 eager, regional torch.compile, AOTInductor engines built
for CUDA, FP8 GEMMs and 8-bit attention, each scored on 96 evaluation pairs (GPU_PAIRS) (and the main ones on
long streams) against fp32 eager on the same GPU (issue 21: every backend within 0.02 of eager; 0.03 where attention takes q in e4m3). Skipped without a CUDA GPU; the FP8 paths also
where the GPU or torchao lacks them (the reason the runtime itself gives)."""

from __future__ import annotations

import pytest
import torch

from ropesp.demo import default_checkpoint, has_default_weights
from ropesp.demo.evaluate import eval_pairs, generate_latents, mean_score, score_pairs
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.settings import RunConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not has_default_weights(), reason="the demo weights are not in this tree"),
]

GPU_PAIRS = 96
"""The short paths are scored on the first 96 pairs of the evaluation's cycle, not its 32: four FP8-sized
roundings of the same model gave 32-pair scores from 0.932 to 0.972 (bench/RESULTS.md twenty-sixth session),
so a 32-pair mean moves by about the tolerance by the draw of its rounding alone; over 96 pairs apply_fp8's
cost on the CPU was 0.010 against 0.024 over 32 (the same weights, same session). On an H100 the shipped
weights' FP8 GEMMs scored 0.957 over 32 pairs where FP8 GEMMs with FP8 attention scored 0.967
(twenty-seventh session)."""
PAIRS = eval_pairs(GPU_PAIRS)
PATH_TOLERANCE = 0.02
"""Every path's mean score within this of fp32 eager on the same GPU (issue 21)."""
E4M3_QUERY_TOLERANCE = 0.03
"""The paths whose attention takes q in e4m3 (`--attention fp8`): e4m3's 3-bit mantissa on q alone,
everything else exact in fp32, costs the demo model 0.017 of its score (0.903 against 0.920,
`scripts/fp8_attention_emulation.py --variants q`), while the kernel's other roundings (k smoothed, v,
P) cost nothing measurable; repeated runs of one path differ by up to 0.007 (bench/RESULTS.md,
thirteenth session). A q scaled by a bound instead of its amax scored 0.858: this still fails it."""


def _score(**overrides) -> float:
    source = {} if "engines" in overrides else {"checkpoint": str(default_checkpoint())}
    cfg = RunConfig.of(device="cuda", **source, **overrides)
    with torch.no_grad():
        latents = generate_latents(build_session(cfg), PAIRS)
    score = mean_score(score_pairs(latents, PAIRS))
    print(f"demo score {overrides}: {score:.3f}")  # the run's record (gpu_run.sh demotests runs with -s)
    return score


@pytest.fixture(scope="module")
def fp32_score() -> float:
    return _score(dtype="float32", cuda_graphs=False)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from ropesp.export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("demo_cuda_aoti")
    return build(
        BuildConfig.of(
            str(out), "aoti", checkpoint=str(default_checkpoint()), dtype="bfloat16", device="cuda"
        )
    )


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="bf16-eager"),
        pytest.param({"backend": "compile"}, id="bf16-compile"),
        pytest.param({"precision": "fp8"}, id="fp8-gemm"),
        pytest.param({"attention": "fa3"}, id="fa3-attention"),
        pytest.param({"attention": "fp8"}, id="fp8-attention"),
        pytest.param({"attention": "int8"}, id="int8-attention"),
        pytest.param({"precision": "fp8", "attention": "fp8"}, id="fp8-gemm-attention"),
    ],
)
def test_gpu_paths_keep_the_score(fp32_score, overrides):
    from ropesp.plugins import attention_8bit, fp8

    if overrides.get("precision") == "fp8" and (why := fp8.fp8_unsupported_reason("cuda")):
        pytest.skip(why)
    if (mode := overrides.get("attention")) and (
        why := attention_8bit.attention_unsupported_reason(mode, "cuda", head_dim=_demo_head_dim())
    ):
        pytest.skip(why)
    assert fp32_score >= 0.9
    tolerance = E4M3_QUERY_TOLERANCE if overrides.get("attention") == "fp8" else PATH_TOLERANCE
    assert abs(_score(dtype="bfloat16", **overrides) - fp32_score) <= tolerance


def _demo_head_dim() -> int:
    cfg = resolve(RunConfig.of(checkpoint=str(default_checkpoint()), device="cpu")).model
    return cfg.dim // cfg.num_heads


def test_cuda_engines_keep_the_score(fp32_score, engines):
    assert abs(_score(engines=str(engines)) - fp32_score) <= PATH_TOLERANCE


def _long_score(**overrides) -> float:
    """The mean score of the long-stream score's own streams (long_jobs: 6 prompts per motion class, 120
    latent frames under the page's window). A sample of 8 streams of 60 frames was too small for a 0.02
    tolerance: single streams move by up to 0.18 under FP8 GEMMs, their mean over 24 full streams by
    0.010 (scripts/fp8_gemm_emulation.py), and on an H100 the 8-stream mean moved by 0.039
    (bench/RESULTS.md twenty-third session)."""
    from ropesp.demo.long_stream import PAGE_WINDOW, generate_streams, long_jobs, score_streams

    jobs = long_jobs()
    source = {"checkpoint": str(default_checkpoint())}
    with torch.no_grad():
        latents = generate_streams(
            RunConfig.of(device="cuda", **source, **PAGE_WINDOW.settings(), **overrides), jobs
        )
    results = score_streams(latents, [(j.prompt, j.seed) for j in jobs])
    score = sum(r.score for r in results) / len(results)
    print(f"demo long-stream score {overrides}: {score:.3f}")
    return score


@pytest.fixture(scope="module")
def fp32_long_score() -> float:
    return _long_score(dtype="float32", cuda_graphs=False)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"backend": "compile"}, id="bf16-compile"),
        pytest.param({"precision": "fp8"}, id="fp8-gemm"),
        pytest.param({"precision": "fp8", "attention": "fp8"}, id="fp8-gemm-attention"),
    ],
)
def test_gpu_paths_keep_the_long_stream_score(fp32_long_score, overrides):
    """Over the long-stream score's streams (_long_score), where every chunk from the model's
    stream_from_frame on runs the stream adapter's blocks (merged, compiled, quantized with the rest), each
    path's score within the tolerance of fp32 eager's long-stream score on the same GPU (the shipped
    weights on an H100: fp32 0.958, compile 0.946, FP8 GEMMs 0.938, FP8 GEMMs + attention 0.932;
    bench/RESULTS.md twenty-seventh and twenty-ninth sessions)."""
    from ropesp.plugins import attention_8bit, fp8

    if overrides.get("precision") == "fp8" and (why := fp8.fp8_unsupported_reason("cuda")):
        pytest.skip(why)
    if (mode := overrides.get("attention")) and (
        why := attention_8bit.attention_unsupported_reason(mode, "cuda", head_dim=_demo_head_dim())
    ):
        pytest.skip(why)
    tolerance = E4M3_QUERY_TOLERANCE if overrides.get("attention") == "fp8" else PATH_TOLERANCE
    assert abs(_long_score(dtype="bfloat16", **overrides) - fp32_long_score) <= tolerance
