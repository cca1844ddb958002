"""Shared pieces of the Triton tests: the client script, the tiny served config, process bookkeeping."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from ropesp.errors import BackendUnavailableError
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

ROOT = Path(__file__).resolve().parents[2]

CONFIG = RunConfig.of(
    preset="tiny",
    latent_height=8,
    latent_width=8,
    latent_frames=6,
    max_frames=30,
    device="cpu",
    dtype="float32",
)
"""2 chunks of 3 latent frames at 8x8 latents (64x64 pixels); the cache allows 30-frame requests."""


def require_triton() -> None:
    """Skip where the serve extra (nvidia-pytriton, tritonclient) is missing."""
    pytest.importorskip("tritonclient.grpc")
    from ropesp.serving.server import find_triton

    try:
        find_triton()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


def load_client():
    """scripts/triton_client.py as a module (scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location("triton_client", ROOT / "scripts" / "triton_client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


class Reference:
    """Latents [F, C, h, w] of direct in-process runs of the served config (one session, cached by seed)."""

    def __init__(self, prompt: torch.Tensor) -> None:
        self.prompt = prompt
        self.session = build_session(CONFIG)
        self.results: dict[int, torch.Tensor] = {}

    def __call__(self, seed: int) -> torch.Tensor:
        if seed not in self.results:
            self.session.reset(self.prompt, seed)
            self.results[seed] = self.session.generate()[0]
        return self.results[seed]


def second_prompt(text_dim: int) -> torch.Tensor:
    """The prompt [1, 13, text_dim] the steering tests change to (seeded)."""
    return torch.randn(1, 13, text_dim, generator=torch.Generator().manual_seed(8)) * 0.1


STEER_FRAMES = 30
"""10 chunks (the served cache): a prompt change sent after chunk 1 lands well before the end."""


def steered_reference(session, prompt, seed, switch=None, frames: int = STEER_FRAMES) -> torch.Tensor:
    """In-process latents [F, C, h, w] of the served config; switch: (chunk, prompt, mode) from that
    chunk on."""
    session.reset(prompt, seed)
    if switch is not None:
        chunk, new, mode = switch
        session.set_prompt(new, mode, at_chunk=chunk)
    session.latent_frames, session.chunk_sizes = frames, session.sampler.chunk_sizes(frames)
    return session.generate()[0]


def steered_run(
    client,
    url,
    prompt,
    seed,
    stream_id,
    new,
    mode,
    after_chunk,
    started=None,
    sequence=False,
    frames=STEER_FRAMES,
    until=None,
):
    """Stream `frames` latent frames; once chunk `after_chunk` has arrived, send the control request.
    sequence: run it as the Triton sequence `stream_id` (stream and control). until: a threading.Event;
    the stream is unbounded instead (frames 0, the served config needs a rolling window) and the client
    leaves it once the event is set and two chunks past the control have arrived, so that it runs, and
    its control finds it, however far the server gets ahead of a slow client. Returns (chunks, the
    control's reported last chunk)."""
    inputs = client.make_inputs(
        prompt[0].numpy(), seed, 0 if until is not None else frames, stream_id=stream_id
    )
    sequence_id = stream_id if sequence else None
    chunks, reported = [], None
    with client.Controller(url) as controller:  # connected before the stream starts
        for chunk in client.stream(url, inputs, timeout_s=120, sequence_id=sequence_id):
            chunks.append(chunk)
            if started is not None:
                started.set()
            if chunk.index == after_chunk:
                change = client.make_control(new[0].numpy(), stream_id, mode)
                reported = controller.send(change, sequence_id=sequence_id)
            if until is not None and until.is_set() and reported is not None and chunk.index >= reported + 3:
                break  # leaving the stream cancels it on the server
    return chunks, reported


def first_switched(chunks) -> int:
    """The first chunk under the changed prompt (prompt_version 0 before it, 1 from it on)."""
    versions = [c.prompt_version for c in chunks]
    assert versions == sorted(versions) and set(versions) <= {0, 1}, versions
    return versions.index(1)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # [state, ppid, pgrp, ...]
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """Running; a zombie (nobody may reap it in a container) does not count."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every live process below pid."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[0] != "Z":
            children.setdefault(int(stat[1]), []).append(int(entry))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            found[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError):
            continue
        todo += children.get(p, [])
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (tritonserver's: its stubs and worker ranks)."""
    return [
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and (s := _stat(int(e))) is not None and s[0] != "Z" and int(s[2]) == pgid
    ]


@contextlib.contextmanager
def running_server(repo: Path, log_path: Path):
    """A real tritonserver on repo (127.0.0.1); on exit it is stopped and nothing it started may be left
    running (its process group empty, every descendant seen while it ran gone)."""
    require_triton()
    from ropesp.serving.server import TritonServer

    server = TritonServer(repo, log_path=log_path)
    procs: dict[int, str] = {}
    try:
        server.start()
        procs = descendants(server.pid)
        yield server, procs
    finally:
        pgid = server.pid
        server.stop()
        if pgid is not None:
            assert group_members(pgid) == [], f"left behind: {procs}"
        assert not [p for p in procs if alive(p)], f"left behind: {procs}"
