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


def test_rendezvous_port_is_held_before_the_ranks_learn_it(monkeypatch):
    """Two groups started side by side (two Triton instances) never share a store: rank 0's port is
    bound and listening before any rank is told it."""
    import socket

    from ropesp.runtime.ranks import RankGroup

    seen = []
    spawn = RankGroup._spawn

    def spawn_checked(self, rank, port):
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", port))
            seen.append("free")
        except OSError:
            seen.append("held")
        finally:
            probe.close()
        return spawn(self, rank, port)

    monkeypatch.setattr(RankGroup, "_spawn", spawn_checked)
    with RankGroup(2, "cpu") as group:
        assert group.call(_rank) == 0
    assert seen == ["held"]


def _rank(mapping: Mapping) -> int:
    return mapping.rank
