"""Process groups and rank math. One launch path: torchrun's environment (or ranks we spawn).

`Mapping` is read once from RANK / WORLD_SIZE / LOCAL_RANK and passed on; a single process is
world size 1 on the same code path.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ropesp.errors import ConfigError


@dataclass(frozen=True)
class Mapping:
    """Where this process sits: rank r of a sequence-parallel group of world_size ranks."""

    world_size: int = 1
    """P, the sequence-parallel size."""
    rank: int = 0
    """This process's rank in [0, world_size)."""
    local_rank: int = 0
    """Device index on this host."""
    alone: bool = False
    """Measurement only: this rank runs without its peers and without a process group; its collectives
    keep their shapes and move no data (runtime/sp.py AloneCollectives), so it does the compute of one
    rank of a world_size group, on wrong data. See `ropesp bench --alone`."""

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
                f"--world-size {requested_world_size} disagrees with WORLD_SIZE={ws} from the launcher"
            )
        return cls(ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def device_for(mapping: Mapping, device: str) -> torch.device:
    """cuda:<local_rank> for CUDA runs, else cpu."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible")
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


LOOPBACK_ENV = "ROPESP_LOOPBACK_STORE"
"""Set to 1 by the launcher of single-host rank groups: init_process_group then meets on loopback."""


def loopback_store(rank: int, world_size: int, port: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store of a single-host group, listening on 127.0.0.1:port only: torch's store
    server would listen on every interface, so rank 0 hands it a socket already bound to loopback."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return dist.TCPStore("127.0.0.1", port, world_size, True, timeout, master_listen_fd=sock.detach())


def init_process_group(mapping: Mapping, device: torch.device, timeout_s: float = 300.0) -> None:
    """NCCL on GPU, gloo on CPU; a no-op at world size 1 and for a rank alone. Needs MASTER_ADDR/PORT
    in the env."""
    if mapping.world_size == 1 or mapping.alone or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = None
    if os.environ.get(LOOPBACK_ENV) == "1":  # ranks ropesp spawned on this host (not torchrun's)
        store = loopback_store(mapping.rank, mapping.world_size, int(os.environ["MASTER_PORT"]), timeout_s)
    dist.init_process_group(
        backend,
        store=store,
        rank=mapping.rank,
        world_size=mapping.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def destroy_process_group() -> None:
    """Leave the group (every group of this process), together with the other ranks: tearing down
    NCCL communicators can wait for the peers' teardown (torch shuts the groups down in a fixed order
    for that reason), so every rank must call this at about the same time, never one rank after
    waiting for another's exit. Callers drop their executors first, so the CUDA graphs that captured
    NCCL collectives are destroyed before the communicators they use."""
    if dist.is_initialized():
        gc.collect()  # the executors' CUDA graphs, freed by the caller, are gone before the comms
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        dist.destroy_process_group()


def abort_process_group() -> None:
    """Leave the group without waiting for the peers (one may have died): NCCL communicators are
    aborted; gloo groups, which never wait in teardown, are destroyed."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()
