"""A real tritonserver whose worker rank is killed: the model restarts its rank group and serves the
next request correctly, so its readiness stays true to what it does."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import numpy as np
import pytest
import torch
from helpers_triton import CONFIG, Reference, alive, descendants, load_client, require_triton

from ropesp.serving.repository import write_repository

pytestmark = pytest.mark.slow


def _workers(pid: int) -> list[int]:
    return [p for p, cmd in descendants(pid).items() if "ropesp.runtime.worker" in cmd]


def _ready(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


def test_killed_worker_rank_is_restarted_and_the_next_request_served(tmp_path, prompt):
    require_triton()
    from ropesp.serving.server import TritonServer

    write_repository(tmp_path / "repo", CONFIG.replace(world_size=2))
    client, reference = load_client(), Reference(prompt)
    inputs = client.make_inputs(prompt[0].numpy(), 3, 6)
    with TritonServer(tmp_path / "repo", log_path=tmp_path / "triton.log") as server:
        first = list(client.stream(server.grpc_url, inputs, timeout_s=120))
        (worker,) = _workers(server.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker)

        second = list(client.stream(server.grpc_url, inputs, timeout_s=180))  # not "reload the model"
        assert [c.index for c in second] == [0, 1]
        for chunks in (first, second):
            got = torch.from_numpy(np.concatenate([c.latents for c in chunks]))
            torch.testing.assert_close(got, reference(3), rtol=0, atol=1e-5)
        (restarted,) = _workers(server.pid)
        assert restarted != worker
        assert _ready(f"http://{server.http_url}/v2/health/ready")
        assert _ready(f"http://{server.http_url}/v2/models/ropesp/ready")
    assert "restarting the rank group (rank 1 died (signal 9))" in (tmp_path / "triton.log").read_text()
