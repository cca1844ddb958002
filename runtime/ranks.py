"""The ranks of one engine: one launcher and one lock-step protocol for every front end.

Rank 0 (the leader) is the process a front end runs in (`ropesp generate`, `ropesp.Pipeline`, the
Triton model, `ropesp demo`, `ropesp bench`). The other ranks come from one of two places:

    spawned   RankGroup.start() runs `python -m ropesp.runtime.worker` for ranks 1..P-1 on this host;
              they meet rank 0 on a loopback store and exit with it (or when it dies)
    torchrun  every process of the group is already running (RANK / WORLD_SIZE in the environment);
              RankGroup.start() on a rank other than 0 follows the leader until it shuts down

After the join, every rank holds the same groups: the default group (NCCL on GPUs, gloo on the CPU)
for the forwards' collectives and the prompts' tensors, and a gloo control group that carries the
leader's commands. The protocol is one loop on every follower:

    command   broadcast_object_list([Command], src=0)       control group (waits while the leader idles)
    tensors   broadcast(t, src=0) per tensor the command names, in order   default group
    then the follower runs the command: BUILD (its rank engine), TICK (stream operations and one
    chunk step, runtime/rank_engine.py), CALL (a function on every rank, e.g. a benchmark), SHUTDOWN.

Every rank applies the same commands in the same order, so every rank makes the same collective
calls. A rank that dies or stalls is named: `failure()` reads the spawned ranks' exit status, and a
collective timeout meets the others at a monitored barrier (runtime/dist.py report_stall).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ropesp.errors import RopespError
from ropesp.processes import stop_process
from ropesp.runtime.dist import (
    Mapping,
    abort_process_group,
    destroy_process_group,
    device_for,
    init_process_group,
    is_collective_timeout,
    loopback_listener,
    report_stall,
    share_host_cores,
)

JOIN_TIMEOUT_S = 600.0
"""Seconds the leader waits for the ranks to join (their imports and model loading come later)."""
IDLE_TIMEOUT = datetime.timedelta(days=365)
"""Followers wait for the next command this long: an idle server must not time out."""
STOP_TIMEOUT_S = 30.0
"""Seconds a spawned rank gets to exit after SHUTDOWN before it is killed."""
PARENT_POLL_S = 1.0
EXIT_WAIT_S = 3.0
"""After a broken collective, how long the leader waits for the rank that caused it to exit (and be named)."""


class RankFailure(RopespError):
    """A rank died, stalled or could not start; the message names it."""

    exit_code = 1


@dataclass
class Command:
    """What the leader tells every rank, in order."""

    kind: str
    """build | tick | call | shutdown."""
    payload: Any = None
    """build: the RunConfig as a dict; tick: rank_engine.Tick; call: (module, function name, args)."""
    tensors: list[tuple[int, ...]] = field(default_factory=list)
    """Shapes of the float32 tensors broadcast after the command, in order (prompts)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_launcher() -> bool:
    """True when torchrun (or a similar launcher) already set up this process's rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class RankGroup:
    """This process's place in an engine's group of ranks, and the protocol between them.

    with RankGroup(2, "cpu") as group:                 # spawns rank 1; this process is rank 0
        group.call(some_module_function, arg)          # fn(mapping, arg) on every rank
    """

    def __init__(
        self,
        world_size: int,
        device: str,
        *,
        mapping: Mapping | None = None,
        port: int | None = None,
        python: str = sys.executable,
        python_path: Sequence[str] = (),
        join_timeout_s: float = JOIN_TIMEOUT_S,
    ) -> None:
        """mapping: this process's rank when it is not the leader that spawns the others: under a
        launcher (torchrun), or a spawned rank (port: the leader's loopback store); None: rank 0,
        spawning ranks 1..P-1 here. python / python_path: the interpreter and extra sys.path entries of
        spawned ranks (the Triton backend's stub runs inside another interpreter)."""
        self.mapping = mapping or Mapping(world_size, 0, 0)
        self.port = port
        self.device_name = device
        self.python, self.python_path = python, list(python_path)
        self.join_timeout_s = join_timeout_s
        self.workers: list[subprocess.Popen] = []
        self.spawned = mapping is None
        self.control: dist.ProcessGroup | None = None
        self._data_device = torch.device("cpu")
        self._threads = torch.get_num_threads()
        self._closed = False

    @property
    def world_size(self) -> int:
        return self.mapping.world_size

    @property
    def is_leader(self) -> bool:
        return self.mapping.rank == 0

    @property
    def device(self) -> torch.device:
        return device_for(self.mapping, self.device_name)

    # --- start --------------------------------------------------------------------------------------
    def start(self) -> RankGroup:
        """Start (or join) the ranks; every rank then holds the default and the control group."""
        try:
            if self.world_size > 1:
                if self.port is not None:  # a rank the leader spawned
                    init_process_group(self.mapping, self.device, self.join_timeout_s, port=self.port)
                    self._open_control()
                elif self.spawned:
                    from ropesp.limits import check_local_ranks

                    check_local_ranks(self.world_size, self.device_name)
                    # the store's port is held from before the ranks learn it: a port probed free and
                    # released could be handed to another group starting beside this one (two Triton
                    # instances), whose ranks would then meet this group's store
                    listener = loopback_listener()
                    try:
                        port = listener.getsockname()[1]
                        self.workers = [self._spawn(rank, port) for rank in range(1, self.world_size)]
                        # a rank that cannot run its own exit watch (stopped) goes with this process anyway
                        atexit.register(_kill, list(self.workers))
                        self._join(port, listener)
                    finally:
                        listener.close()  # a no-op once the store has taken it
                else:
                    init_process_group(self.mapping, self.device, self.join_timeout_s)
                    self._open_control()
                share_host_cores(self.world_size)
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def _spawn(self, rank: int, port: int) -> subprocess.Popen:
        cmd = [self.python, "-m", "ropesp.runtime.worker", "--rank", str(rank)]
        cmd += ["--world-size", str(self.world_size), "--port", str(port), "--parent-pid", str(os.getpid())]
        cmd += ["--device", self.device_name]
        # the leader's own import path first: a rank imports what the leader's commands name (a CALL's
        # function may live in the caller's own modules)
        own = [os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)]
        paths = [*self.python_path, *own, *filter(None, [os.environ.get("PYTHONPATH")])]
        paths = list(dict.fromkeys(paths))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        # its own process group: a terminal's Ctrl-C goes to the leader, which stops the ranks it owns
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)

    def _join(self, port: int, listener: socket.socket) -> None:
        """Join the group on a thread while watching the spawned ranks, so one that dies fails fast;
        listener: the store's socket, listening on port."""
        result: list = []
        abandon = threading.Event()

        def join() -> None:
            try:
                init_process_group(
                    self.mapping,
                    self.device,
                    self.join_timeout_s,
                    port=port,
                    listener=listener,
                    abandon=abandon,
                )
                self._open_control()
                result.append(None)
            except Exception as exc:
                result.append(exc)

        thread = threading.Thread(target=join, name="ropesp-join", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.join_timeout_s
        try:
            while thread.is_alive():
                thread.join(0.2)
                reason = self._dead_worker(" while starting")
                if reason:
                    raise RankFailure(reason)
                if time.monotonic() > deadline:
                    raise RankFailure(f"the ranks did not join within {self.join_timeout_s:.0f} s")
        except BaseException:  # a rank failed, the deadline passed, or the caller was interrupted
            # a thread still waiting for ranks that will never come would stay blocked in the store
            abandon.set()
            thread.join(1.0)
            raise
        if result and isinstance(result[0], Exception):
            raise RankFailure(f"joining the process group failed: {result[0]}") from result[0]

    def _open_control(self) -> None:
        # a gloo timeout is each rank's own: a follower waits for the next command as long as the leader
        # idles, while the leader's sends are bounded (a stopped follower must not hold it forever)
        wait = IDLE_TIMEOUT if not self.is_leader else datetime.timedelta(seconds=self.join_timeout_s)
        self.control = dist.new_group(backend="gloo", timeout=wait)
        self._data_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def bound_sends(self, seconds: float) -> None:
        """Leader: from now on a command waits at most `seconds` for the ranks to take it (the streaming
        collectives' bound, runtime/dist.py set_collective_timeout)."""
        if self.is_leader and self.control is not None:
            from torch.distributed import distributed_c10d as c10d

            if hasattr(c10d, "_set_pg_timeout"):
                c10d._set_pg_timeout(datetime.timedelta(seconds=seconds), self.control)

    # --- the protocol -------------------------------------------------------------------------------
    def send(self, command: Command, tensors: Sequence[torch.Tensor] = ()) -> None:
        """Leader: tell every rank `command`; the float32 tensors follow over the default group."""
        assert self.is_leader
        if self.world_size == 1:
            return
        command.tensors = [tuple(t.shape) for t in tensors]
        dist.broadcast_object_list([command], src=0, group=self.control)
        for t in tensors:
            dist.broadcast(t.to(self._data_device, torch.float32).contiguous(), src=0)

    def receive(self) -> tuple[Command, list[torch.Tensor]]:
        """Follower: the leader's next command and its tensors (CPU float32)."""
        box: list = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        command: Command = box[0]
        tensors = []
        for shape in command.tensors:
            t = torch.empty(shape, dtype=torch.float32, device=self._data_device)
            dist.broadcast(t, src=0)
            tensors.append(t.cpu())
        return command, tensors

    def call(self, fn: Callable, *args: Any) -> Any:
        """fn(mapping, *args) on every rank (fn a module-level function, args picklable); returns the
        leader's result. Collectives inside fn run in step on every rank. A function of a script run as
        `python script.py` is found by the script's path."""
        module = fn.__module__
        where = getattr(sys.modules.get(module), "__file__", None) if module == "__main__" else None
        self.send(Command("call", (module, fn.__qualname__, args, where)))
        return fn(self.mapping, *args)

    def follow(self, handlers: dict[str, Callable[[Any, list[torch.Tensor]], None]]) -> None:
        """Follower: run the leader's commands until SHUTDOWN (CALL is handled here; the others by
        `handlers`, by kind)."""
        assert not self.is_leader
        while True:
            command, tensors = self.receive()
            if command.kind == "shutdown":
                return
            if command.kind == "call":
                module, name, args, where = command.payload
                fn = _script(where) if where else importlib.import_module(module)
                for part in name.split("."):
                    fn = getattr(fn, part)
                fn(self.mapping, *args)
                continue
            handlers[command.kind](command.payload, tensors)

    # --- health -------------------------------------------------------------------------------------
    def _dead_worker(self, when: str = "") -> str | None:
        for rank, proc in enumerate(self.workers, start=1):
            if proc.poll() is None and _exiting(proc.pid):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_TIMEOUT_S)  # its last threads are still exiting
            code = proc.poll()
            if code is not None:
                how = f"died (signal {-code})" if code < 0 else f"exited with status {code}"
                return f"rank {rank} {how}{when}"
        return None

    def failure(self, exc: BaseException | None = None) -> str:
        """Why the group broke, in one line that names the rank: a spawned rank's exit, a stall found at
        a monitored barrier (after a collective timeout), or the error itself."""
        # a rank that failed is reaped a moment after its peers see its connections close (it may still
        # be printing its traceback): give it that moment
        deadline = time.monotonic() + (EXIT_WAIT_S if self.workers else 0.0)
        while True:
            reason = self._dead_worker()
            if reason:
                return reason
            if time.monotonic() >= deadline or (exc is not None and is_collective_timeout(exc)):
                break
            time.sleep(0.1)
        if exc is not None and is_collective_timeout(exc):
            return report_stall(self.mapping.rank) or "a collective timed out"
        if exc is not None:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, RopespError):
                return text
            if "Connection reset" in text or "Connection closed" in text or "Broken pipe" in text:
                return "a rank left the group (its connection closed)"
            return f"{type(exc).__name__}: {text[:200]}"
        return "the rank group failed"

    def healthy(self) -> bool:
        return not self._closed and self._dead_worker() is None

    # --- stop ---------------------------------------------------------------------------------------
    def close(self, graceful: bool = True) -> None:
        """Shut the ranks down (spawned ones are killed if they do not exit) and leave the group;
        idempotent. graceful: tell them first (SHUTDOWN) and leave together; else abort (a peer may be
        dead or stuck in a collective)."""
        if self._closed:
            return
        self._closed = True
        graceful = (
            graceful and self.world_size > 1 and self.control is not None and self._dead_worker() is None
        )
        try:
            if graceful and self.is_leader:
                self.send(Command("shutdown"))
        except Exception:
            graceful = False
        finally:
            if graceful:
                destroy_process_group()  # while the other ranks leave it too
            # never Popen.wait() here: a Ctrl-C may have leaked its lock (ropesp.processes)
            for proc in self.workers:
                stop_process(proc, STOP_TIMEOUT_S if graceful else 0.1)
            self.workers = []
            if not graceful:
                abort_process_group()
            torch.set_num_threads(self._threads)

    def __enter__(self) -> RankGroup:
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        self.close(graceful=exc_type is None)


def run_on_ranks(world_size: int, device: str, fn: Callable, *args: Any) -> Any:
    """fn(mapping, *args) on world_size ranks spawned here (this process is rank 0); rank 0's result.
    For scripts and tests that run one program on every rank (RankGroup.call)."""
    with RankGroup(world_size, device) as group:
        return group.call(fn, *args)


def _script(path: str):
    """The module of a script the leader runs as __main__, loaded here under another name (its
    `if __name__ == "__main__"` block does not run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ropesp_leader_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _kill(processes: list[subprocess.Popen]) -> None:
    for proc in processes:
        stop_process(proc, 0.0)


def _exiting(pid: int) -> bool:
    """A process whose main thread has exited (a zombie) but which waitpid cannot report yet: a killed
    multi-threaded process shows this while its other threads are still going down."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return False


def exit_with_parent(parent_pid: int) -> None:
    """Exit as soon as the parent (the leader) is gone, even while blocked in a collective."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(3)

    threading.Thread(target=watch, name="ropesp-parent-watch", daemon=True).start()


def ignore_interrupts() -> None:
    """A follower leaves Ctrl-C to the leader, which stops every rank at a chunk boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
