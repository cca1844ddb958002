"""Prompt changes on engines: ONNX Runtime segments (1 and 2 ranks) and AOTInductor packages switch
exactly like the definition."""

from __future__ import annotations

import pytest
import torch
from engine_builds import run_generate
from switch_reference import generate_with_switches

from ropesp.runtime.pipeline import build_session, resolve
from ropesp.settings import RunConfig

ATOL = 1e-4  # float32 engine kernels (ORT, Inductor) against eager PyTorch, as test_export_onnx/aoti.py


@pytest.fixture(scope="module")
def switch_prompts(tmp_path_factory, tiny_cfg):
    tmp = tmp_path_factory.mktemp("switch")
    g = torch.Generator("cpu").manual_seed(31)
    out = []
    for i, n in enumerate((20, 11)):
        t = torch.randn(n, tiny_cfg.text_dim, generator=g) * 0.1
        torch.save(t, tmp / f"p{i}.pt")
        out.append((str(tmp / f"p{i}.pt"), t))
    return out


@pytest.mark.parametrize(
    ("backend", "world_size", "mode"),
    [("onnx", 1, "swap"), ("onnx", 1, "recache"), ("onnx", 2, "recache"), ("aoti", 1, "recache")],
)
def test_engine_switch_equals_definition(builds, switch_prompts, tmp_path, backend, world_size, mode):
    (p0, e0), (p1, e1) = switch_prompts
    root = builds(backend, world_size)
    args = ["--engines", str(root), "--prompt-embeds", p0, "--prompt-at", "1", p1, "--prompt-mode", mode]
    got = run_generate(tmp_path, *args)
    res = resolve(
        RunConfig.of(
            preset="tiny", latent_height=10, latent_width=14, latent_frames=6, device="cpu", dtype="float32"
        )
    )
    executor = build_session(res).executor  # eager, the weights the build used (seeded)
    want = generate_with_switches(
        executor, res.config.sampler, res.cache, (10, 14), [3, 3], {0: e0, 1: e1}, 3, mode
    )
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    unswitched = run_generate(tmp_path, "--engines", str(root), "--prompt-embeds", p0)
    assert (got[:, 3:] - unswitched[:, 3:]).abs().max() > 10 * ATOL  # the switch changed chunk 1
    torch.testing.assert_close(got[:, :3], unswitched[:, :3], rtol=0, atol=0)


def test_pipeline_on_ort_engines_streams_and_names_python_arguments(builds, switch_prompts):
    import ropesp
    from ropesp.errors import EngineError

    (_, e0), (_, e1) = switch_prompts
    root = str(builds("onnx", 1))
    with ropesp.Pipeline(engines=root, decoder=None) as pipe:  # backend, device, dtype from the manifest
        assert pipe.resolved.backend == "ort"
        stream = pipe.stream(e0, seed=3, frames=21, latents=True)
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            stream.set_prompt(e1, mode="recache")
        assert [c.prompt_version for c in chunks] == [0, 1]
    with pytest.raises(EngineError, match=r"was built for dtype='float32'; this run asks for bfloat16"):
        ropesp.Pipeline(engines=root, dtype="bfloat16", decoder=None)
