"""The collectives of sequence parallelism (all-to-all, all-gather, ring steps) and its modes.

The runners that use them (Ulysses, hybrid Ulysses x ring) are in runtime/runners.py.
`sp_rope`: "local" rotates this rank's tokens where they are (Causal-RoPE SP), "allgather" is the
baseline that gathers q and k to the full chunk first; `sp_comm`: "fused" sends q, k and v in one
all-to-all, "unfused" in three (the baseline). All modes produce the same outputs.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch
import torch.distributed as dist

from ropesp.errors import ConfigError

SP_ROPE_MODES = ("local", "allgather")
SP_COMM_MODES = ("fused", "unfused")


class CollectiveLog:
    """An observer of a rank's collectives, handed to `Collectives(observer=...)` by tests and bench
    (product code passes none): counts per kind (tests assert the per-layer call pattern) and, from
    `start_timing()` on, the time spent inside each call (bench's communication share)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._timing: list | None = None

    def start_timing(self) -> None:
        """Record the time of every collective from now on (CUDA events: no host sync)."""
        self._timing = []

    def elapsed_ms(self) -> float:
        """Milliseconds spent inside collectives since start_timing (synchronizes the device)."""
        if not self._timing:
            return 0.0
        if isinstance(self._timing[0][0], float):
            return sum(end - start for start, end in self._timing) * 1e3
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self._timing)

    def begin(self, kind: str, device: torch.device):
        """Count one call of `kind`; returns its start mark for `end` (None while not timing)."""
        self.counts[kind] += 1
        return None if self._timing is None else _now(device)

    def end(self, mark, device: torch.device) -> None:
        if mark is not None:
            self._timing.append((mark, _now(device)))


def _now(device: torch.device):
    """A timestamp: a recorded CUDA event on GPU (no host sync), the host clock otherwise."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class Collectives:
    """The collectives SP uses, over `group` (None: the default group) of sp_size ranks."""

    needs_peers = True
    """The calls move data between the ranks: a process group must exist (AloneCollectives: none)."""

    def __init__(
        self, group: dist.ProcessGroup | None, sp_size: int, observer: CollectiveLog | None = None
    ) -> None:
        self.group = group
        self.sp_size = sp_size
        self.observer = observer
        self._into_tensor = dist.is_initialized() and dist.get_backend(group) == "nccl"

    def with_group(self, group: dist.ProcessGroup, sp_size: int) -> Collectives:
        """The same kind of collectives, seen by the same observer, over a sub-group (the hybrid
        layout's Ulysses group)."""
        return Collectives(group, sp_size, self.observer)

    @contextlib.contextmanager
    def _timed(self, kind: str, device: torch.device):
        if self.observer is None:
            yield
            return
        mark = self.observer.begin(kind, device)
        yield
        self.observer.end(mark, device)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Exchange x [P, ...] (slice j goes to rank j) -> [P, ...] (slice j came from rank j)."""
        x = x.contiguous()
        out = torch.empty_like(x)
        with self._timed("all_to_all", x.device):
            dist.all_to_all_single(out, x, group=self.group)
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [...] on every rank -> [P, ...] stacked in rank order."""
        x = x.contiguous()
        with self._timed("all_gather", x.device):
            if self._into_tensor:
                out = x.new_empty((self.sp_size, *x.shape))
                dist.all_gather_into_tensor(out, x, group=self.group)
                return out
            parts = [torch.empty_like(x) for _ in range(self.sp_size)]
            dist.all_gather(parts, x, group=self.group)
        return torch.stack(parts)

    def ring_shift_start(self, send: torch.Tensor, recv: torch.Tensor, next_rank: int, prev_rank: int):
        """Start one ring step (send to next_rank, receive from prev_rank; global ranks) and return
        its handle: compute can run until `ring_shift_wait(handle)`."""
        send = send.contiguous()
        mark = None if self.observer is None else self.observer.begin("ring_p2p", send.device)
        ops = [dist.P2POp(dist.isend, send, next_rank), dist.P2POp(dist.irecv, recv, prev_rank)]
        return dist.batch_isend_irecv(ops), send, mark

    def ring_shift_wait(self, handle) -> None:
        reqs, send, mark = handle
        for req in reqs:
            req.wait()
        if self.observer is not None:
            self.observer.end(mark, send.device)


class AloneCollectives(Collectives):
    """The collectives of one rank of a P-rank group run by itself (measurement only: bench hands them
    in for `ropesp bench --alone`).

    Every call keeps the shapes of the real one and moves no data: an all-to-all returns its input (this
    rank's own slices stand in for its peers'), an all-gather repeats this rank's part. What runs around
    them is exactly one rank's compute at world size P (GEMMs over L/P tokens, attention over H/P
    heads), so timing it beside a real P-rank run splits the scaling loss into compute and
    communication. The outputs are not the model's. No process group is needed."""

    needs_peers = False

    def __init__(self, sp_size: int, observer: CollectiveLog | None = None) -> None:
        super().__init__(None, sp_size, observer)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        with self._timed("all_to_all", x.device):
            return x.contiguous()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        with self._timed("all_gather", x.device):
            return x.unsqueeze(0).expand(self.sp_size, *x.shape)

    def ring_shift_start(self, send, recv, next_rank, prev_rank):
        raise ConfigError("a rank alone has no ring peers: the hybrid (ring) layout needs its process group")
