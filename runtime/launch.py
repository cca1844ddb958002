"""Launching ranks: under torchrun (env already set) or N local ranks spawned by ropesp itself.

A failing rank makes every rank exit: torch.multiprocessing terminates the others when one exits
non-zero, and the process group is always destroyed on the way out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import torch
import torch.multiprocessing as mp

from ropesp.errors import RopespError
from ropesp.runtime.dist import (
    LOOPBACK_ENV,
    Mapping,
    destroy_process_group,
    device_for,
    init_process_group,
    is_collective_timeout,
    report_stall,
    share_host_cores,
)

EXIT_GRACE_S = 3.0
"""After one rank failed, how long the others may take to report and exit before they are killed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(mapping: Mapping, device: str) -> Iterator[torch.device]:
    """Init the group for this rank (no-op at world size 1); always destroyed on exit."""
    dev = device_for(mapping, device)
    init_process_group(mapping, dev)
    try:
        yield dev
    except BaseException:
        if mapping.world_size > 1:
            # a peer may be blocked in a collective and destroying the group would wait for it
            # forever: leave the group to die with this process, which the launcher then reaps
            raise
        destroy_process_group()
        raise
    destroy_process_group()


def _rank_entry(
    rank: int, world_size: int, port: int, fn: Callable, args: tuple, forked: bool = False
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **{LOOPBACK_ENV: "1"},  # the rendezvous listens on 127.0.0.1 only
    )
    if forked and "torch._inductor.async_compile" in sys.modules:
        # the parent's Inductor compile-worker pool (its threads) does not survive fork: compiling in
        # this process through it would wait forever, so compile in-process
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
    if os.environ.get("ROPESP_HANG_DUMP_S"):  # diagnosis: every rank's Python stacks, periodically
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["ROPESP_HANG_DUMP_S"]), repeat=True)
    share_host_cores(world_size)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's: it stops every rank
    try:
        fn(Mapping(world_size, rank, rank), *args)
    except RopespError as exc:
        print(f"ropesp: error (rank {rank}): {exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)  # no interpreter teardown: it could wait on peers stuck in a collective
    except BaseException as exc:
        if is_collective_timeout(exc):
            line = report_stall(rank)
            if line:
                print(f"ropesp: error (rank {rank}): {line}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(2)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def spawn_ranks(world_size: int, fn: Callable, *args) -> None:
    """Run fn(mapping, *args) on world_size local processes; raises RankFailure if any fails."""
    port = free_port()
    # fork is much faster to start on the CPU; CUDA cannot be forked once initialised
    method = "spawn" if torch.cuda.is_available() else "fork"
    context = mp.start_processes(
        _rank_entry,
        args=(world_size, port, fn, args, method == "fork"),
        nprocs=world_size,
        join=False,
        start_method=method,
    )
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # its SIGTERM/SIGKILL notes: the failing rank already said why
    try:
        # after a rank fails, the others get EXIT_GRACE_S to report and exit before they are killed
        while not context.join(grace_period=EXIT_GRACE_S):
            pass
    except KeyboardInterrupt:
        _stop(context.processes)
        raise
    except mp.ProcessExitedException as exc:
        raise RankFailure(f"rank {exc.error_index} exited with status {exc.exit_code}") from None
    except mp.ProcessRaisedException as exc:
        raise RankFailure(f"a rank failed:\n{exc}") from None
    finally:
        spawn_log.setLevel(level)


def _stop(processes) -> None:
    """Stop every rank still running (SIGTERM, then SIGKILL after EXIT_GRACE_S) and reap it."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + EXIT_GRACE_S
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()  # a stopped (SIGSTOP) rank never sees SIGTERM
            proc.join()


def under_launcher() -> bool:
    """True when torchrun (or a similar launcher) already set up this process's rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class RankFailure(RopespError):
    """A spawned rank failed; every rank has exited."""
