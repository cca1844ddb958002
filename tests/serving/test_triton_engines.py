"""Built engines behind Triton: `serve-repo --engines` copies them into a relocatable repository."""

import shutil

import pytest
import torch
from helpers_triton import load_client, require_triton

from ropesp.cli import main
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.runtime.prompts import default_prompt_embeds
from ropesp.serving.server import TritonServer
from ropesp.settings import RunConfig


@pytest.mark.slow
def test_onnx_engines_served_from_a_moved_repository(tmp_path):
    require_triton()
    client = load_client()
    engines, repo = tmp_path / "engines", tmp_path / "repo"
    grid = ["--latent-height", "8", "--latent-width", "8"]
    assert (
        main(
            [
                "build",
                "--preset",
                "tiny",
                *grid,
                "--max-frames",
                "6",
                "--backend",
                "onnx",
                "--out",
                str(engines),
            ]
        )
        == 0
    )
    assert main(["serve-repo", "--engines", str(engines), "--out", str(repo)]) == 0
    shutil.rmtree(engines)  # the repository holds its own copy
    moved = shutil.move(str(repo), str(tmp_path / "moved"))
    cfg = RunConfig.of(
        preset="tiny", latent_height=8, latent_width=8, latent_frames=6, device="cpu", dtype="float32"
    )
    prompt = default_prompt_embeds(resolve(cfg).model)
    session = build_session(cfg)
    session.reset(prompt, seed=2)
    eager = session.generate()
    with TritonServer(moved) as server:
        chunks = list(client.stream(server.grpc_url, client.make_inputs(prompt[0].numpy(), 2, 6)))
    assert [c.index for c in chunks] == [0, 0, 1]  # serve-repo's first frame apart, then the rest
    served = torch.cat([torch.from_numpy(c.latents) for c in chunks])[None]
    # ONNX Runtime vs eager, fp32: the same tolerance as the engine tests (tests/export)
    torch.testing.assert_close(served, eager, rtol=0, atol=1e-4)
