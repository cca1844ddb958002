"""SessionGroup without Triton: 2 gloo ranks in lock-step equal one rank; cancel, shutdown, no leftovers."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from ropesp.decode import PreviewDecoder
from ropesp.errors import ConfigError
from ropesp.runtime.group import SessionGroup
from ropesp.runtime.launch import RankFailure
from ropesp.runtime.pipeline import PipelineConfig, build_session

CONFIG = PipelineConfig(
    preset="tiny", latent_height=8, latent_width=8, latent_frames=6, device="cpu", dtype="float32"
)


def _reference(prompt, seed: int) -> torch.Tensor:
    session = build_session(CONFIG)
    session.reset(prompt, seed)
    return session.generate()


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that may never come in a container does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_group_two_ranks_request_cancel_shutdown(prompt):
    want = _reference(prompt, seed=3)
    group = SessionGroup(dataclasses.replace(CONFIG, world_size=2), decoder=PreviewDecoder())
    threads = torch.get_num_threads()
    try:
        group.start()
        (worker,) = group.workers
        req = group.check(prompt, seed=3, latent_frames=6)
        chunks = list(group.stream(req))
        assert [c.index for c in chunks] == [0, 1]
        assert chunks[0].frames.shape == (1, 9, 64, 64, 3)  # rank 0 decodes (preview: 8x upscale)
        torch.testing.assert_close(torch.cat([c.latents for c in chunks], 1), want, rtol=0, atol=1e-5)

        # a latents-only request skips rank 0's decoder and stays in step with the worker
        plain = list(group.stream(group.check(prompt, seed=3, latent_frames=6, frames=False)))
        assert [c.frames for c in plain] == [None, None]
        torch.testing.assert_close(torch.cat([c.latents for c in plain], 1), want, rtol=0, atol=1e-5)

        # cancelled after the first chunk: every rank stops there, and the next request is in step
        assert [c.index for c in group.stream(req, cancelled=lambda: True)] == [0]
        stream = group.stream(req)
        next(stream)
        stream.close()  # a consumer that walks away cancels as well
        again = torch.cat([c.latents for c in group.stream(req)], 1)
        torch.testing.assert_close(again, want, rtol=0, atol=1e-5)

        # refused on rank 0 before anything is broadcast, with the CLI's messages
        with pytest.raises(ConfigError, match="must be a positive multiple of --chunk-frames 3"):
            group.check(prompt, seed=3, latent_frames=4)
        with pytest.raises(ConfigError, match="expected \\[L, 4096\\]"):
            group.check(prompt[..., :100], seed=3, latent_frames=6)
        with pytest.raises(ConfigError, match="serves 64 x 64 pixels"):
            group.check(prompt, seed=3, latent_frames=6, height=64, width=96)
        assert group.check(prompt, seed=3, latent_frames=6, height=64, width=64).latent_frames == 6
        assert worker.poll() is None
    finally:
        group.close()
    assert worker.returncode == 0  # SHUTDOWN: the worker left the group and exited cleanly
    assert not _alive(worker.pid)
    assert not dist.is_initialized()
    assert torch.get_num_threads() == threads


def test_group_worker_that_dies_at_start_fails_fast():
    group = SessionGroup(dataclasses.replace(CONFIG, world_size=2), python="/bin/false")
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match="worker rank 1 exited with status 1 while starting"):
        group.start()
    assert time.monotonic() - t0 < 30
    assert group.workers == []
    # rank 0's joining thread ended with the start: none is left blocked in the store
    assert [t.name for t in threading.enumerate() if t.name == "ropesp-join"] == []


LEADER = """
import sys, time
from ropesp.runtime.group import SessionGroup
from ropesp.runtime.pipeline import PipelineConfig
group = SessionGroup(PipelineConfig(preset="tiny", latent_height=8, latent_width=8, latent_frames=6,
                                    device="cpu", dtype="float32", world_size=2)).start()
print(group.workers[0].pid, flush=True)
time.sleep(600)
"""


def test_group_worker_exits_when_rank0_is_killed():
    leader = subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(leader.stdout.readline())
        assert _alive(worker_pid)
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        deadline = time.monotonic() + 20
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker_pid), "the worker rank outlived rank 0"
    finally:
        leader.kill()
        leader.wait()
