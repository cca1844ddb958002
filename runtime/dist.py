"""Process groups and rank math: joining, leaving, bounded waits that name a stalled rank.

`Mapping` is read once from RANK / WORLD_SIZE / LOCAL_RANK and passed on; a single process is
world size 1 on the same code path.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ropesp.errors import ConfigError, arg


@dataclass(frozen=True)
class Mapping:
    """Where this process sits: rank r of a sequence-parallel group of world_size ranks."""

    world_size: int = 1
    """P, the sequence-parallel size."""
    rank: int = 0
    """This process's rank in [0, world_size)."""
    local_rank: int = 0
    """Device index on this host."""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside [0, world size {self.world_size})")

    @classmethod
    def from_env(cls, requested_world_size: int | None = None) -> Mapping:
        """Read torchrun's variables; check them against --world-size when both are given."""
        env_ws = os.environ.get("WORLD_SIZE")
        if env_ws is None:
            return cls(world_size=requested_world_size or 1)
        ws = int(env_ws)
        if requested_world_size is not None and requested_world_size != ws:
            raise ConfigError(
                f"{arg('world_size', requested_world_size)} disagrees with WORLD_SIZE={ws} from the launcher"
            )
        return cls(ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def device_for(mapping: Mapping, device: str) -> torch.device:
    """cuda:<local_rank> for CUDA runs, else cpu."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{arg('device', 'cuda')} was asked for, but no CUDA GPU is visible")
        return torch.device("cuda", mapping.local_rank)
    return torch.device(device)


def parse_device(spec: str, flag: str) -> torch.device:
    """A device named on the command line ('cpu', 'cuda', 'cuda:N'), checked to exist here. Indices are
    of the GPUs this process sees (every rank sees all of them: ranks pick cuda:<local_rank>)."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {spec!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"{flag} {spec!r}: only cpu and cuda devices are supported")
    count = torch.cuda.device_count()
    index = 0 if device.index is None else device.index
    if index >= count:
        raise ConfigError(f"{flag} {spec}: this machine has {count} visible CUDA GPU(s)")
    return torch.device("cuda", index)


JOINED_KEY = "ropesp/joined"
"""Store counter of the ranks that reached a loopback store; rank 0 enters the process group's own
rendezvous only when it reads the world size, so a rank that never comes leaves no thread blocked there."""
JOIN_POLL_S = 0.05


def loopback_listener(port: int = 0) -> socket.socket:
    """A TCP socket listening on 127.0.0.1:port (0: a free port the kernel picks, held from now on)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def loopback_store(
    rank: int, world_size: int, port: int, timeout_s: float, listener: socket.socket | None = None
) -> dist.TCPStore:
    """The rendezvous store of a single-host group, listening on 127.0.0.1:port only: torch's store
    server would listen on every interface, so rank 0 hands it a socket already bound to loopback
    (`listener`, which the store then owns, else one bound here). Rank 0's store does not wait for the
    others (`wait_for_ranks` does, abandonably)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    sock = listener if listener is not None else loopback_listener(port)
    return dist.TCPStore(
        "127.0.0.1", port, world_size, True, timeout, wait_for_workers=False, master_listen_fd=sock.detach()
    )


def wait_for_ranks(
    store: dist.Store, world_size: int, timeout_s: float, abandon: threading.Event | None = None
) -> None:
    """Count this rank in at the store and wait until all world_size ranks have; raises TimeoutError
    after timeout_s, or RuntimeError as soon as `abandon` is set (by the caller that watches the other
    ranks' processes)."""
    deadline = time.monotonic() + timeout_s
    joined = store.add(JOINED_KEY, 1)
    while joined < world_size:
        if abandon is not None and abandon.is_set():
            raise RuntimeError("the rendezvous was abandoned (a rank failed to start)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{joined} of {world_size} ranks reached the rendezvous in {timeout_s:.0f} s")
        time.sleep(JOIN_POLL_S)
        joined = store.add(JOINED_KEY, 0)


def init_process_group(
    mapping: Mapping,
    device: torch.device,
    timeout_s: float = 300.0,
    *,
    port: int | None = None,
    listener: socket.socket | None = None,
    abandon: threading.Event | None = None,
) -> None:
    """Join this rank's group: NCCL on GPU, gloo on CPU; a no-op at world size 1. The one init of both
    ways ranks come (runtime/ranks.py): ranks the leader spawned meet on a loopback store at
    127.0.0.1:port; torchrun's ranks at the rendezvous its env names (MASTER_ADDR/PORT), where an existing
    group is kept. A group started on `port` must be new. listener: rank 0's socket already listening on
    `port` (loopback_listener: held since before the other ranks were told the port). abandon: set by a
    caller on another thread to end a loopback rendezvous that waits for ranks that died."""
    if mapping.world_size == 1 or (port is None and dist.is_initialized()):
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # group names (and their store keys) count the process's groups: a start that failed inside
        # torch's rendezvous (a worker died after reaching the store) can leave the count advanced, and
        # this rank's next group would wait for keys a fresh worker never writes
        dist.distributed_c10d._world.group_count = 0
    store = None
    if port is not None:
        store = loopback_store(mapping.rank, mapping.world_size, port, timeout_s, listener)
        try:
            wait_for_ranks(store, mapping.world_size, timeout_s, abandon)
            failed = None
        except (TimeoutError, RuntimeError) as exc:
            failed = exc.with_traceback(None)
        if failed is not None:
            # stop the store server now, on this thread, and raise without the frames that hold it: a
            # store kept alive by a traceback and collected later in a forked child would wait forever
            # for a server thread the fork did not copy
            del store
            raise failed
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        store=store,
        rank=mapping.rank,
        world_size=mapping.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    open_watch_group()


def share_host_cores(world_size: int) -> None:
    """The ranks on this host share its cores: this process takes cores / world_size threads (more
    threads than cores per rank only thrashes; GPU ranks too, for their host-side tensor work, which
    spun P x all-cores OpenMP threads on a 64-core GPU host)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def destroy_process_group() -> None:
    """Leave the group (every group of this process), together with the other ranks: tearing down
    NCCL communicators can wait for the peers' teardown (torch shuts the groups down in a fixed order
    for that reason), so every rank must call this at about the same time, never one rank after
    waiting for another's exit. Callers drop their executors first, so the CUDA graphs that captured
    NCCL collectives are destroyed before the communicators they use."""
    _WATCH.clear()  # a group object kept past its group would hang a later fork's teardown of it
    if dist.is_initialized():
        gc.collect()  # the executors' CUDA graphs, freed by the caller, are gone before the comms
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        dist.destroy_process_group()


def abort_process_group() -> None:
    """Leave the group without waiting for the peers (one may have died): NCCL communicators are
    aborted; gloo groups, which never wait in teardown, are destroyed."""
    _WATCH.clear()
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


# --- bounded waits: a stalled rank is found and named ------------------------------------------
STALL_PROBE_S = 5.0
"""How long the ranks that timed out wait for each other at the monitored barrier that names the
stalled ones."""
_WATCH: dict = {}
"""'group': a gloo group that only finds stalled ranks; 'timeout_s': the collective timeout set."""


def open_watch_group() -> None:
    """Create the gloo group report_stall() uses (collective: every rank calls it after joining)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    # its own short timeout: a send to a stopped peer would otherwise wait gloo's default 30 min
    _WATCH["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=STALL_PROBE_S))
    from torch.distributed import distributed_c10d as c10d

    store = c10d._get_default_store()  # every rank's host and pid, while all are alive
    store.set(f"ropesp/proc/{dist.get_rank()}", f"{socket.gethostname()} {os.getpid()}")
    _WATCH["procs"] = [store.get(f"ropesp/proc/{r}").decode().split() for r in range(dist.get_world_size())]


def set_collective_timeout(seconds: float) -> None:
    """From now on a collective of the default group waits at most `seconds` for the peers. Called once
    every rank has built its session: setup (loading, compiling) ran under the longer join timeout,
    and the barrier keeps a rank that is still setting up from counting as stalled."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch.distributed import distributed_c10d as c10d

    dist.barrier()
    if hasattr(c10d, "_set_pg_timeout"):  # torch >= 2.3; older: the join timeout stays
        c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))
        _WATCH["timeout_s"] = seconds


def is_collective_timeout(exc: BaseException) -> bool:
    """A collective that gave up waiting for its peers (gloo raises it in the calling thread)."""
    return isinstance(exc, RuntimeError) and "timed out" in str(exc).lower()


def report_stall(rank: int) -> str | None:
    """After a collective timeout: the ranks that timed out meet at a monitored barrier, so rank 0
    learns which ranks never arrived. Returns the one-line report this rank should print (rank 0's
    names the stalled ranks; another rank reports only when rank 0 itself does not answer)."""
    group = _WATCH.get("group")
    limit = _WATCH.get("timeout_s")
    what = f"a collective waited longer than {_timeout_setting(limit)}" if limit else "a collective timed out"
    if group is None:
        return f"{what} for the other ranks"
    try:
        dist.monitored_barrier(
            group=group, timeout=datetime.timedelta(seconds=STALL_PROBE_S), wait_all_ranks=True
        )
        return f"{what}, though every rank is alive (a slow rank)"
    except RuntimeError as exc:
        if rank != 0:  # rank 0 names the stalled ranks, unless it is the one stopped
            return f"{what}: rank 0 stalled (stopped)" if _stopped(0) else None
        found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(exc))
        if not found:
            return f"{what} for the other ranks"
        ranks = [r for r in found.group(1).replace(" ", "").split(",") if r]
        who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)}"
        return f"{what}: {who} stalled (stopped or hung)"


def _timeout_setting(seconds: float) -> str:
    """The collective timeout as the caller set it: `--collective-timeout 5 s` on the command line,
    `collective_timeout=5 s` from Python (errors.python_names)."""
    return f"{arg('collective_timeout', int(seconds) if seconds == int(seconds) else seconds)} s"


def _stopped(rank: int) -> bool:
    """Whether a rank on this host is stopped (SIGSTOP, a debugger) or gone; False when unknown."""
    procs = _WATCH.get("procs")
    if not procs or procs[rank][0] != socket.gethostname():
        return False
    try:
        with open(f"/proc/{procs[rank][1]}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t", "Z")
    except OSError:
        return True
