"""Lock-step serving: rank 0 takes the requests, ranks 1..P-1 follow it chunk by chunk.

Every rank must make the same collective calls in the same order, so rank 0 (the Triton model
instance, or any caller of `SessionGroup`) tells the workers what to run next:

    header   broadcast_object_list([{command, seed, latent_frames, prompt_shape}], src=0)
                                                             control group (gloo, waits while idle)
    prompt   broadcast(prompt_embeds [1, L, text_dim] fp32, src=0)   default group (NCCL on GPU)
    chunks   every rank resets its session and iterates it; after each chunk rank 0 decides:
             broadcast(int64 [3] (CONTINUE | CANCEL | SWITCH, mode, L), src=0)   control group
    switch   (after SWITCH) broadcast(new prompt [1, L, text_dim] fp32, src=0)  default group;
             every rank queues it for its next chunk (StreamSession.set_prompt, mode swap | recache)

A cancel or a prompt change is decided on rank 0 at a chunk boundary, so all ranks stop after the same
chunk, or switch before the same chunk.
SHUTDOWN makes the workers destroy the process group and exit. Workers are real Python processes
(`python -m ropesp.runtime.group ...`) that rank 0 starts in `SessionGroup.start()`; each one also
exits on its own when its parent process dies.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from ropesp.config import VAE_STRIDE
from ropesp.errors import ConfigError, RopespError
from ropesp.limits import check_local_ranks
from ropesp.runtime.dist import (
    Mapping,
    abort_process_group,
    destroy_process_group,
    device_for,
    init_process_group,
    share_host_cores,
)
from ropesp.runtime.executor import check_prompt_embeds
from ropesp.runtime.launch import RankFailure, free_port
from ropesp.runtime.pipeline import PipelineConfig, ResolvedPipeline, build_session
from ropesp.runtime.session import PROMPT_MODES, Chunk, StreamSession, check_unbounded

STARTUP_TIMEOUT_S = 600.0
"""Seconds rank 0 waits for the workers to join the group (model loading included)."""
COLLECTIVE_TIMEOUT_S = 300.0
"""Timeout of the collectives inside a request."""
IDLE_TIMEOUT = datetime.timedelta(days=365)
"""Workers wait for the next header this long: an idle server must not time out."""
STOP_TIMEOUT_S = 30.0
"""Seconds a worker gets to exit after SHUTDOWN before it is killed."""
PARENT_POLL_S = 1.0


class Command(IntEnum):
    """What rank 0 tells the workers: in a header (GENERATE, SHUTDOWN) or at a chunk boundary."""

    GENERATE = 0
    CONTINUE = 1
    CANCEL = 2
    SHUTDOWN = 3
    SWITCH = 4


@dataclass(frozen=True)
class Request:
    """One validated stream request, as every rank runs it."""

    prompt_embeds: torch.Tensor
    """[1, L, text_dim] float32 on the CPU."""
    seed: int
    latent_frames: int | None
    """None: an unbounded stream (it ends when rank 0 cancels it)."""
    frames: bool = True
    """Decode this request's chunks (False: latents only, the decoder is skipped)."""

    def header(self) -> dict:
        """What the workers need besides the prompt tensor."""
        sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)[1:]}
        return {"command": int(Command.GENERATE), "prompt_shape": list(self.prompt_embeds.shape), **sizes}

    @classmethod
    def from_header(cls, header: dict, prompt_embeds: torch.Tensor) -> Request:
        return cls(prompt_embeds, *(header[f.name] for f in dataclasses.fields(cls)[1:]))


class RankPipeline:
    """This rank's executor, and a session per request around it (sizes checked like the CLI's)."""

    def __init__(self, res: ResolvedPipeline, mapping: Mapping, decoder=None) -> None:
        self.res, self.decoder = res, decoder
        self.executor = build_session(res, mapping, decoder).executor
        self._resolved: dict[int, ResolvedPipeline] = {}

    def resolve(self, latent_frames: int | None) -> ResolvedPipeline:
        """The pipeline of one request, checked by PipelineConfig.resolve (the CLI's checks and messages);
        latent_frames None (unbounded) needs the pipeline's rolling window."""
        if latent_frames is None:
            check_unbounded(self.res.cache)
            return self.res
        if latent_frames not in self._resolved:  # resolve() may read a checkpoint's header: once per size
            request = dataclasses.replace(
                self.res.request,
                latent_frames=latent_frames,
                max_frames=self.res.cache.max_frames,
                world_size=self.res.world_size,
            )
            self._resolved[latent_frames] = request.resolve()
        return self._resolved[latent_frames]

    def session(self, req: Request) -> StreamSession:
        """A session for the request, reset to its prompt and seed."""
        res = self.resolve(req.latent_frames)
        # lock-step: a DiT thread running ahead of the chunk decisions could not stop with the workers
        overlap = False if res.world_size > 1 else None
        session = StreamSession(
            self.executor,
            res.request.sampler,
            res.geometry,
            req.latent_frames,
            self.decoder if req.frames else None,
            overlap_decode=overlap,
        )
        session.reset(req.prompt_embeds, req.seed)
        return session


class _Channel:
    """The broadcasts of the protocol, from rank 0 to every rank."""

    def __init__(self, device: torch.device) -> None:
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.data_device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def header(self, header: dict | None = None) -> dict:
        box = [header]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def prompt(self, prompt: torch.Tensor | None = None, shape: Sequence[int] = ()) -> torch.Tensor:
        t = prompt if prompt is not None else torch.empty(tuple(shape), dtype=torch.float32)
        t = t.to(self.data_device)
        dist.broadcast(t, src=0)
        return t.cpu()

    def decision(
        self, command: Command | None = None, mode: int = 0, tokens: int = 0
    ) -> tuple[Command, int, int]:
        """(command, prompt mode index, prompt tokens) from rank 0; the last two matter for SWITCH."""
        t = torch.tensor([int(command) if command is not None else -1, mode, tokens], dtype=torch.int64)
        dist.broadcast(t, src=0, group=self.control)
        c, m, n = (int(v) for v in t.tolist())
        return Command(c), m, n


def _init_group(
    mapping: Mapping, device: str, port: int, timeout_s: float, abandon: threading.Event | None = None
) -> _Channel:
    """Join the P-rank group at 127.0.0.1:port (gloo on the CPU, NCCL on GPUs) and its control group
    (abandon: as runtime.dist.init_process_group's)."""
    dev = device_for(mapping, device)
    init_process_group(mapping, dev, timeout_s, port=port, abandon=abandon)
    return _Channel(dev)


def _share_cpu(res: ResolvedPipeline) -> None:
    """This rank's share of the host's cores (runtime/dist.py share_host_cores)."""
    if res.world_size > 1:
        share_host_cores(res.world_size)


class SessionGroup:
    """Rank 0 of a P-rank streaming pipeline; world size 1 runs the same code without workers.

    with SessionGroup(config) as group:
        req = group.check(prompt_embeds, seed=0, latent_frames=21)   # ConfigError if invalid
        for chunk in group.stream(req, cancelled=lambda: False): ...
    """

    def __init__(
        self,
        config: PipelineConfig,
        *,
        decoder=None,
        python: str = sys.executable,
        python_path: Sequence[str] = (),
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.res = config.resolve()
        self.mapping = Mapping(self.res.world_size, 0, 0)
        self.decoder = decoder
        self.python, self.python_path = python, list(python_path)
        self.startup_timeout_s = startup_timeout_s
        self.workers: list[subprocess.Popen] = []
        self.pipeline: RankPipeline | None = None
        self._channel: _Channel | None = None
        self._failure: str | None = None
        self._session: StreamSession | None = None
        self._threads = torch.get_num_threads()

    def start(self) -> SessionGroup:
        """Start ranks 1..P-1, join the group with them and build this rank's session."""
        try:
            if self.res.world_size > 1:
                check_local_ranks(self.res.world_size, self.res.device)
                port = free_port()
                self.workers = [self._spawn(rank, port) for rank in range(1, self.res.world_size)]
                self._channel = self._join(port)
            _share_cpu(self.res)
            self.pipeline = RankPipeline(self.res, self.mapping, self.decoder)
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, rank: int, port: int) -> subprocess.Popen:
        cmd = [self.python, "-m", "ropesp.runtime.group", "--rank", str(rank)]
        cmd += ["--world-size", str(self.res.world_size), "--port", str(port)]
        cmd += ["--parent-pid", str(os.getpid()), "--config", json.dumps(self.res.request.to_dict())]
        paths = [*self.python_path, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def _join(self, port: int) -> _Channel:
        """Join the group on a thread while watching the workers, so a crashed one fails fast."""
        result: list = []
        abandon = threading.Event()

        def join() -> None:
            try:
                result.append(_init_group(self.mapping, self.res.device, port, COLLECTIVE_TIMEOUT_S, abandon))
            except Exception as exc:
                result.append(exc)

        thread = threading.Thread(target=join, name="ropesp-join", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while thread.is_alive():
                thread.join(0.2)
                for rank, proc in enumerate(self.workers, start=1):
                    if proc.poll() is not None:
                        raise RankFailure(
                            f"worker rank {rank} exited with status {proc.returncode} while starting"
                        )
                if time.monotonic() > deadline:
                    raise RankFailure(f"the worker ranks did not join within {self.startup_timeout_s:.0f} s")
        except BaseException:  # a worker failed, the deadline passed, or the caller was interrupted
            # a thread still waiting for ranks that will never come would stay blocked in the store
            # until its timeout (and may outlive the interpreter): end it before leaving
            abandon.set()
            thread.join(1.0)
            raise
        if isinstance(result[0], Exception):
            raise RankFailure(f"joining the process group failed: {result[0]}") from result[0]
        return result[0]

    def check(
        self,
        prompt_embeds: torch.Tensor,
        seed: int,
        latent_frames: int | None,
        height=None,
        width=None,
        frames: bool = True,
    ) -> Request:
        """Validate a request -> Request; raises ConfigError naming the problem.

        latent_frames None: an unbounded stream (needs the pipeline's rolling window).
        height/width (pixels) are optional; the pipeline serves the size it was configured for.
        frames=False skips the decoder for this request (its chunks carry latents only).
        """
        if latent_frames is not None and int(latent_frames) < 1:  # None: until cancelled
            raise ConfigError(f"latent_frames {int(latent_frames)} must be >= 1")
        prompt = self.check_prompt(prompt_embeds)
        g = self.res.geometry
        served = (g.latent_height * VAE_STRIDE[1], g.latent_width * VAE_STRIDE[2])
        if (height, width) not in ((None, None), served):
            raise ConfigError(
                f"height x width {height} x {width}: this pipeline serves {served[0]} x {served[1]} pixels "
                "(its engines and KV cache are built for that size); set --height/--width when writing it"
            )
        latent_frames = None if latent_frames is None else int(latent_frames)
        self.pipeline.resolve(latent_frames)
        return Request(prompt, int(seed), latent_frames, bool(frames))

    def check_prompt(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """One stream's prompt embeddings, checked -> float32 [1, L, text_dim] (ConfigError otherwise)."""
        prompt = check_prompt_embeds(self.res.model, prompt_embeds)
        if prompt.shape[0] != 1 or prompt.dtype != torch.float32:
            raise ConfigError(
                f"prompt embeddings must be float32 [L, {self.res.model.text_dim}] for one stream, got "
                f"{prompt.dtype} {tuple(prompt_embeds.shape)}"
            )
        return prompt.contiguous()

    def stream(
        self,
        req: Request,
        cancelled: Callable[[], bool] = lambda: False,
        switch: Callable[[], tuple[torch.Tensor, str] | None] = lambda: None,
    ) -> Iterator[Chunk]:
        """Run one request on every rank; yields rank 0's chunks. After each chunk cancelled() is asked,
        then switch(): a (checked prompt [1, L, text_dim] fp32, mode) comes into effect on every rank
        before the next chunk the DiT starts (the next one, or one later with an overlapped producer)."""
        if not self.healthy():
            self.recover()
        chunks = self._guarded(self._begin, req)
        try:
            while True:
                chunk = self._guarded(next, chunks, None)
                if chunk is None:
                    return
                stop, change = True, None
                try:
                    yield chunk
                    stop = bool(cancelled())
                    change = None if stop else switch()
                finally:
                    self._guarded(self._decide, Command.CANCEL if stop else Command.CONTINUE, change)
                if stop:
                    return
        finally:
            chunks.close()  # an overlapped DiT thread stops now, not at the next request

    def healthy(self) -> bool:
        """Every rank can serve: no failure so far and every worker process alive."""
        if self._failure is None:
            for rank, proc in enumerate(self.workers, start=1):
                if proc.poll() is None and _exiting(proc.pid):
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(STOP_TIMEOUT_S)  # its last threads are still exiting
                if proc.poll() is not None:
                    self._failure = f"worker rank {rank} exited with status {proc.returncode}"
        return self._failure is None and self.pipeline is not None

    def recover(self) -> None:
        """Replace a failed group (a dead or stuck worker leaves the ranks out of step for good): stop
        every rank, then start them again, so the next request is served. RankFailure if that fails."""
        reason = self._failure or "the group was closed"
        print(f"ropesp: restarting the rank group ({reason})", file=sys.stderr, flush=True)
        self.close()
        self._failure = None
        try:
            self.start()
        except Exception as exc:
            self._failure = f"restart failed: {exc}"
            raise RankFailure(f"the rank group failed ({reason}) and could not be restarted: {exc}") from exc

    def _begin(self, req: Request) -> Iterator[Chunk]:
        if self._channel is not None:
            self._channel.header(req.header())
            self._channel.prompt(req.prompt_embeds)
        self._session = self.pipeline.session(req)
        return iter(self._session)

    def _decide(self, command: Command, change: tuple[torch.Tensor, str] | None = None) -> None:
        if change is not None:
            prompt, mode = change
            command = Command.SWITCH
            if self._channel is not None:
                self._channel.decision(command, PROMPT_MODES.index(mode), prompt.shape[1])
                self._channel.prompt(prompt)
            self._session.set_prompt(prompt, mode)
        elif self._channel is not None:
            self._channel.decision(command)

    def _guarded(self, step, *args):
        """Run one step of the protocol; a failure inside it leaves the ranks out of step for good."""
        try:
            return step(*args)
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            raise

    def close(self) -> None:
        """Shut the workers down (killed if they do not exit) and leave the group; idempotent.

        After a clean SHUTDOWN every rank leaves the group at once (NCCL teardown waits for the peers);
        after a failure the group is aborted, since a peer may be dead."""
        channel, self._channel = self._channel, None
        graceful = channel is not None and not self._failure
        try:
            if graceful:
                channel.header({"command": int(Command.SHUTDOWN)})
        except BaseException:
            graceful = False
            raise
        finally:
            self.pipeline = None  # its CUDA graphs captured NCCL calls: gone before the group
            if graceful:
                destroy_process_group()  # while the workers leave it too
            for proc in self.workers:
                try:
                    proc.wait(STOP_TIMEOUT_S if graceful else 0.1)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.workers = []
            abort_process_group()  # a no-op after the graceful path
            torch.set_num_threads(self._threads)

    def __enter__(self) -> SessionGroup:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _exiting(pid: int) -> bool:
    """A process whose main thread has exited (a zombie) but which waitpid cannot report yet: a killed
    multi-threaded process shows this while its other threads are still going down."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False


def run_worker(res: ResolvedPipeline, mapping: Mapping, port: int) -> None:
    """Rank 1..P-1: join the group, then receive -> reset -> iterate in lock-step, until SHUTDOWN."""
    channel = _init_group(mapping, res.device, port, COLLECTIVE_TIMEOUT_S)
    pipeline = None
    try:
        _share_cpu(res)
        pipeline = RankPipeline(res, mapping)
        while True:
            header = channel.header()
            if header["command"] == Command.SHUTDOWN:
                return
            prompt = channel.prompt(shape=header["prompt_shape"])
            session = pipeline.session(Request.from_header(header, prompt))
            for _ in session:
                command, mode, tokens = channel.decision()
                if command == Command.CANCEL:
                    break
                if command == Command.SWITCH:
                    text_dim = res.model.text_dim
                    session.set_prompt(channel.prompt(shape=(1, tokens, text_dim)), PROMPT_MODES[mode])
    finally:
        del pipeline  # its CUDA graphs captured NCCL calls: gone before the group
        destroy_process_group()


def _exit_with_parent(parent_pid: int) -> None:
    """Exit as soon as the parent (rank 0) is gone, even while blocked in a collective."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="ropesp-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker rank (started by SessionGroup.start, not by users)."""
    p = argparse.ArgumentParser(prog="python -m ropesp.runtime.group", description=main.__doc__)
    for name in ("--rank", "--world-size", "--port", "--parent-pid"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--config", required=True, help="the PipelineConfig as JSON (PipelineConfig.to_dict)")
    args = p.parse_args(argv)
    _exit_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for rank 0 to handle
    try:
        res = PipelineConfig.from_dict(json.loads(args.config)).resolve()
        run_worker(res, Mapping(args.world_size, args.rank, args.rank), args.port)
    except RopespError as exc:
        print(f"ropesp: error (worker rank {args.rank}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
