"""The one launch path across "nodes": two torchrun agents on 127.0.0.1 meet at a c10d rendezvous, each
starts 2 ranks, and `ropesp generate` on the 4 gloo ranks gives the latents of one rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import torch

from ropesp.cli import main
from ropesp.runtime.ranks import free_port

SIZE = ["--preset", "tiny", "--latent-height", "10", "--latent-width", "14", "--latent-frames", "6"]
RUN = [*SIZE, "--dtype", "float32", "--device", "cpu", "--seed", "3"]
TIMEOUT_S = 150.0
"""Both agents together (about 30 s on two busy cores: six Python processes import torch)."""
TAG = "ROPESP_TORCHRUN_TEST"
"""Set for the agents, inherited by their workers (which torchrun starts in sessions of their own):
what finds every process the test started, even one whose agent is gone."""


def _tagged(tag: str) -> list[int]:
    """The live processes whose environment carries TAG=tag."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{TAG}={tag}".encode() in env and state != "Z":
            found.append(int(entry))
    return found


def _stop(agents: list[subprocess.Popen], tag: str) -> None:
    """SIGTERM to each agent's session (an agent then stops its workers), SIGKILL to anything left."""
    for proc in agents:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10.0
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _tagged(tag):
        os.kill(pid, signal.SIGKILL)
    for proc in agents:
        proc.wait()


def test_two_torchrun_nodes_give_the_latents_of_one_rank(tmp_path):
    one = tmp_path / "one.pt"
    assert main(["generate", *RUN, "--output", str(tmp_path / "one.mp4"), "--latents-out", str(one)]) == 0

    tag, port = uuid.uuid4().hex, free_port()
    # gloo's pairs on the loopback interface: nothing of the test listens beyond 127.0.0.1
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", **{TAG: tag})
    four = tmp_path / "four.pt"
    out = ["--world-size", "4", "--output", str(tmp_path / "four.mp4"), "--latents-out", str(four)]
    agents, logs = [], []
    try:
        for node in (0, 1):
            log = open(tmp_path / f"node{node}.log", "wb")
            logs.append(log)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2"]
            cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]
            cmd += ["--node-rank", str(node), "-m", "ropesp.cli", "generate", *RUN, *out]
            agents.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
        deadline = time.monotonic() + TIMEOUT_S
        codes = [proc.wait(max(1.0, deadline - time.monotonic())) for proc in agents]
    finally:
        _stop(agents, tag)
        for log in logs:
            log.close()
    text = "\n".join((tmp_path / f"node{n}.log").read_text(errors="replace") for n in (0, 1))
    assert codes == [0, 0], text
    assert not _tagged(tag)
    # fp32: the 4 ranks differ from one rank only in the order of reductions (as in test_sp)
    torch.testing.assert_close(torch.load(four), torch.load(one), rtol=0, atol=1e-5)
    assert "wrote" in text and "Traceback" not in text
