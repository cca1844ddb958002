"""The serve quick start as the README writes it: `serve-repo` with no model flags serves the embedded
demo model, and a text prompt of its grammar streams through Triton exactly what `ropesp.Pipeline`
makes in this process from the same text (the first Triton run shows the picture of the first
`generate`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_triton import load_client, running_server

import ropesp
from ropesp.cli import main
from ropesp.serving.repository import read_model_config

pytestmark = pytest.mark.slow
PROMPT = "two blue discs bouncing"


def test_the_demo_model_streams_a_text_prompt_as_in_process(tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["serve-repo", "--out", str(repo), "--device", "cpu"]) == 0
    client = load_client()
    with running_server(repo, tmp_path / "tritonserver.log") as (server, _):
        inputs = client.make_inputs(PROMPT, 5, 6)
        chunks = list(client.stream(server.grpc_url, inputs, timeout_s=120))
        out = tmp_path / "out.mp4"
        argv = ["--url", server.grpc_url, "--prompt", PROMPT, "--latent-frames", "6", "--output", str(out)]
        assert client.main(argv) == 0
    assert out.stat().st_size > 0
    assert [c.frames.shape[0] for c in chunks] == [1, 8, 12]  # serve-repo's first frame apart
    served = torch.from_numpy(np.concatenate([c.latents for c in chunks]))[None]
    pipe = ropesp.Pipeline.from_config(read_model_config(repo / "ropesp" / "1").config)
    try:
        want = pipe.generate(PROMPT, seed=5, frames=21).latents
    finally:
        pipe.close()
    torch.testing.assert_close(served, want, rtol=0, atol=1e-5)
