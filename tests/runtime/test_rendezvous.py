"""Single-host rank groups listen on loopback only: no rendezvous port on the host's other interfaces."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch.distributed as dist

from ropesp.runtime.dist import Mapping
from ropesp.runtime.launch import process_group, spawn_ranks


def listening_addresses(pid: int) -> list[str]:
    """'address:port' of every TCP socket of process pid in the LISTEN state (from /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            for line in list(f)[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                addr, port = local.split(":")
                if width == 4:
                    ip = ".".join(str(b) for b in reversed(bytes.fromhex(addr)))
                else:
                    ip = "::1" if addr == "0" * 24 + "01000000" else ("::" if set(addr) == {"0"} else addr)
                found.append(f"{ip}:{int(port, 16)}")
    return found


def _rank(mapping: Mapping, out: str) -> None:
    with process_group(mapping, "cpu"):
        dist.barrier()  # every socket of the group is open now
        addresses = listening_addresses(os.getpid())
        Path(out, f"rank{mapping.rank}.json").write_text(json.dumps(addresses))
        dist.barrier()


def test_spawned_ranks_listen_on_loopback_only(tmp_path):
    spawn_ranks(2, _rank, str(tmp_path))
    listening = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    assert listening[0], "rank 0 serves the rendezvous store: it must be listening somewhere"
    for rank, addresses in listening.items():
        assert all(a.startswith("127.0.0.1:") for a in addresses), (rank, addresses)


def test_served_worker_group_listens_on_loopback_only(tmp_path):
    from ropesp.runtime.group import SessionGroup
    from ropesp.runtime.pipeline import PipelineConfig

    config = PipelineConfig(preset="tiny", latent_height=8, latent_width=8, latent_frames=3, device="cpu")
    with SessionGroup(dataclasses.replace(config, world_size=2)) as group:
        addresses = listening_addresses(os.getpid())
        workers = [listening_addresses(p.pid) for p in group.workers]
    assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), addresses
    assert all(a.startswith("127.0.0.1:") for w in workers for a in w), workers
