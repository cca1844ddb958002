"""Single-host rank groups listen on loopback only: no rendezvous port on the host's other interfaces."""

from __future__ import annotations

import os

import torch.distributed as dist

from ropesp.runtime.dist import Mapping


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


def _listening(mapping: Mapping) -> list[str]:
    dist.barrier()  # every socket of the group is open now
    addresses = listening_addresses(os.getpid())
    dist.barrier()
    return addresses


def test_spawned_ranks_listen_on_loopback_only():
    from ropesp.runtime.ranks import RankGroup

    with RankGroup(2, "cpu") as group:
        leader = group.call(_listening)
        workers = [listening_addresses(p.pid) for p in group.workers]
    assert leader, "rank 0 serves the rendezvous store: it must be listening somewhere"
    for addresses in [leader, *workers]:
        assert all(a.startswith("127.0.0.1:") for a in addresses), addresses
