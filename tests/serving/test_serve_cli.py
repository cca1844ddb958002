"""`ropesp serve-repo` + `ropesp serve` with 2 gloo ranks behind Triton: equal to one rank, clean SIGINT."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers_triton import Reference, alive, descendants, load_client, require_triton

from ropesp.cli import main
from ropesp.runtime.ranks import free_port

pytestmark = pytest.mark.slow

REPO_ARGS = ["--preset", "tiny", "--latent-height", "8", "--latent-width", "8", "--latent-frames", "6"]
REPO_ARGS += ["--max-frames", "30", "--device", "cpu", "--dtype", "float32"]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ropesp serve exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise AssertionError("ropesp serve did not become ready")


def test_serve_world_size_2_equals_world_size_1_and_stops_on_sigint(tmp_path, prompt):
    require_triton()
    repo = tmp_path / "repo"
    assert main(["serve-repo", "--out", str(repo), "--world-size", "2", *REPO_ARGS]) == 0
    assert 'string_value: "2"' in (repo / "ropesp" / "config.pbtxt").read_text()
    http, grpc = free_port(), free_port()
    cmd = [sys.executable, "-m", "ropesp.cli", "serve", "--repo", str(repo)]
    proc = subprocess.Popen(
        [*cmd, "--http-port", str(http), "--grpc-port", str(grpc)],
        stderr=subprocess.PIPE,
        text=True,
    )
    procs: dict[int, str] = {}
    try:
        _wait_ready(f"127.0.0.1:{http}", proc)
        procs = descendants(proc.pid)
        assert sum("ropesp.runtime.worker" in cmd for cmd in procs.values()) == 1, procs  # rank 1
        client = load_client()
        inputs = client.make_inputs(prompt[0].numpy(), 3, 6)
        chunks = list(client.stream(f"127.0.0.1:{grpc}", inputs, timeout_s=120))
        assert [c.index for c in chunks] == [0, 0, 1]  # serve-repo's first frame apart, then the rest
        got = torch.from_numpy(np.concatenate([c.latents for c in chunks]))
        torch.testing.assert_close(got, Reference(prompt)(3), rtol=0, atol=1e-5)

        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [cmd for p, cmd in procs.items() if alive(p)], "left behind"
