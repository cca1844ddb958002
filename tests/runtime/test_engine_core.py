"""The engine core on real ranks (gloo, spawned processes): lock-step equals one rank, cancel, refusals,
a rank that dies at start or mid-stream is named and replaced, nothing is left running."""

from __future__ import annotations

import os
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
from ropesp.runtime.engine_core import EngineCore
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.runtime.ranks import RankFailure
from ropesp.settings import RunConfig

CONFIG = RunConfig.of(
    preset="tiny", latent_height=8, latent_width=8, latent_frames=6, device="cpu", dtype="float32"
)


def _reference(prompt, seed: int) -> torch.Tensor:
    session = build_session(CONFIG)
    session.reset(prompt, seed)
    return session.generate()


def _latents(chunks) -> torch.Tensor:
    return torch.cat([c.latents for c in chunks], dim=1)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that may never come in a container does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_two_ranks_in_step_equal_one_rank_cancel_and_close(prompt):
    want = _reference(prompt, seed=3)
    threads = torch.get_num_threads()
    core = EngineCore(resolve(CONFIG.replace(world_size=2)), decoder=PreviewDecoder())
    try:
        core.start()
        (worker,) = core.workers
        chunks = list(core.open(core.request(prompt, seed=3, latent_frames=6)))
        assert [c.index for c in chunks] == [0, 1]
        assert chunks[0].frames.shape == (1, 9, 64, 64, 3)  # rank 0 decodes (preview: 8x upscale)
        torch.testing.assert_close(_latents(chunks), want, rtol=0, atol=1e-5)

        # a latents-only stream skips rank 0's decoder and stays in step with the other rank
        plain = list(core.open(core.request(prompt, seed=3, latent_frames=6, decode=False)))
        assert [c.frames for c in plain] == [None, None]
        torch.testing.assert_close(_latents(plain), want, rtol=0, atol=1e-5)

        # cancelled after the first chunk: every rank drops the stream there, and the next one is in step
        stream = core.open(core.request(prompt, seed=3, latent_frames=6))
        assert next(stream).index == 0
        stream.cancel()
        assert list(stream) == []
        assert not stream.set_prompt(prompt)  # an ended stream takes no prompt change
        torch.testing.assert_close(_latents(core.open(core.request(prompt, 3, 6))), want, rtol=0, atol=1e-5)

        # refused on rank 0 before anything reaches the ranks, with the settings' messages
        with pytest.raises(ConfigError, match="does not tile into chunks of --chunk-frames 3"):
            core.request(prompt, seed=3, latent_frames=4)
        with pytest.raises(ConfigError, match=r"expected \[L, 4096\]"):
            core.request(prompt[..., :100], seed=3, latent_frames=6)
        with pytest.raises(ConfigError, match="serves 64 x 64 pixels"):
            core.request(prompt, seed=3, latent_frames=6, height=64, width=96)
        with pytest.raises(ConfigError, match="exceeds the KV cache of 6 latent frames"):
            core.request(prompt, seed=3, latent_frames=9)
        assert core.request(prompt, seed=3, latent_frames=6, height=64, width=64).latent_frames == 6
        assert worker.poll() is None
    finally:
        core.close()
    assert worker.returncode == 0  # SHUTDOWN: the rank left the group and exited cleanly
    assert not _alive(worker.pid)
    assert not dist.is_initialized()
    assert torch.get_num_threads() == threads
    assert not [t.name for t in threading.enumerate() if t.name in ("ropesp-engine", "ropesp-decode")]


def test_a_rank_that_dies_at_start_fails_fast():
    core = EngineCore(resolve(CONFIG.replace(world_size=2)), python="/bin/false")
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 exited with status 1 while starting"):
        core.start()
    assert time.monotonic() - t0 < 30
    assert core.workers == []
    # rank 0's joining thread ended with the start: none is left blocked in the store
    assert [t.name for t in threading.enumerate() if t.name == "ropesp-join"] == []


def test_a_killed_rank_is_named_and_the_next_stream_restarts_the_ranks(prompt, capfd):
    want = _reference(prompt, seed=3)
    unbounded = CONFIG.replace(world_size=2, local_attn_frames=6, sink_frames=3)
    with EngineCore(resolve(unbounded)).start() as core:
        (first,) = core.workers
        stream = core.open(core.request(prompt, seed=3, latent_frames=None))
        next(stream)
        os.kill(first.pid, signal.SIGKILL)
        with pytest.raises(RankFailure, match=r"^rank 1 died \(signal 9\)$"):
            for _ in range(20):
                next(stream)
        t0 = time.monotonic()
        got = _latents(core.open(core.request(prompt, seed=3, latent_frames=6)))  # served by a new rank 1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        (second,) = core.workers
        assert second.pid != first.pid and second.poll() is None and core.healthy()
        assert time.monotonic() - t0 < 60
    assert "restarting the rank group (rank 1 died (signal 9))" in capfd.readouterr().err


LEADER = """
import time
from ropesp.runtime.engine_core import EngineCore
from ropesp.runtime.pipeline import resolve
from ropesp.settings import RunConfig
core = EngineCore(resolve(RunConfig.of(preset="tiny", latent_height=8, latent_width=8, latent_frames=6,
                                       device="cpu", dtype="float32", world_size=2))).start()
print(core.workers[0].pid, flush=True)
time.sleep(600)
"""


def test_a_rank_exits_when_rank0_is_killed():
    leader = subprocess.Popen([sys.executable, "-c", LEADER], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(leader.stdout.readline())
        assert _alive(worker_pid)
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        deadline = time.monotonic() + 20
        while _alive(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker_pid), "the rank outlived rank 0"
    finally:
        leader.kill()
        leader.wait()
