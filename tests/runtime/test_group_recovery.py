"""A dead worker rank no longer breaks the served group for good: the group restarts its ranks and the
next request is served (and equals the one-rank reference)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import torch

from ropesp.runtime.group import SessionGroup
from ropesp.runtime.pipeline import PipelineConfig, build_session

CONFIG = PipelineConfig(
    preset="tiny", latent_height=8, latent_width=8, latent_frames=6, device="cpu", dtype="float32"
)


def _latents(chunks) -> torch.Tensor:
    return torch.cat([c.latents for c in chunks], dim=1)


def test_group_restarts_after_a_worker_is_killed(prompt, capfd):
    session = build_session(CONFIG)
    session.reset(prompt, 3)
    want = session.generate()
    with SessionGroup(dataclasses.replace(CONFIG, world_size=2)) as group:
        (first,) = group.workers
        torch.testing.assert_close(_latents(group.stream(group.check(prompt, 3, 6))), want, rtol=0, atol=1e-5)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert not group.healthy()
        t0 = time.monotonic()
        got = _latents(group.stream(group.check(prompt, 3, 6)))  # served by a new rank 1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        (second,) = group.workers
        assert second.pid != first.pid and second.poll() is None and group.healthy()
        assert time.monotonic() - t0 < 60
    assert "restarting the rank group (worker rank 1 exited with status -9)" in capfd.readouterr().err
