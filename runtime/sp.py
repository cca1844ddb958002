"""Sequence parallelism (Ulysses) with Causal-RoPE SP: the per-chunk runner of a P-rank group.

Per block: this rank's tokens [B, L/P, H, D] get q/k/v, RMSNorm and RoPE locally — positions come
from (start_frame, first_token, grid), so nothing is gathered for RoPE — then ONE all-to-all moves
q, k and v together to the head-sharded layout [B, L, H/P, D]; attention runs against this rank's
head-sharded persistent KV cache; ONE all-to-all brings the output back to [B, L/P, H, D].

Baselines kept for measurement (PAPER.md): `sp_rope="allgather"` gathers q and k to the full chunk
and applies the reference float64 RoPE there; `sp_comm="unfused"` sends q, k and v in three
all-to-alls. All modes produce the same outputs.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch
import torch.distributed as dist

from ropesp.errors import ConfigError
from ropesp.model.kv_cache import CacheSlots, KVCache, attention
from ropesp.model.rope import rope_apply_ref
from ropesp.parallel import TokenShard

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


class UlyssesRunner:
    """ChunkRunner of one rank in a Ulysses group (P >= 2).

    `comm` spans the Ulysses group (the all-to-alls); `world` spans every rank of the chunk (the
    head's all-gather and the baseline's gather-then-RoPE); they are the same group in pure Ulysses.
    """

    _kv_blocks = True
    """Keys and values go into the cache straight from the exchange's [U, L_local] blocks where the chunk
    has no SP padding (one copy fewer); HybridRunner's ring cache takes flat tokens."""

    def __init__(
        self,
        cache: KVCache | None,
        slots: CacheSlots | None,
        shard: TokenShard,
        comm: Collectives,
        rope,
        *,
        world: Collectives | None = None,
        sp_rope: str = "local",
        sp_comm: str = "fused",
        start_frame: int = 0,
        grid: tuple[int, int, int] = (1, 1, 1),
        theta: float = 10000.0,
        attend=attention,
    ) -> None:
        self.cache, self.slots, self.shard_info, self.comm = cache, slots, shard, comm
        self.attend = attend  # attend(q, k, v) -> out, [B, L, H/P, D]: the attention kernel
        self.world = world or comm
        self.first_token = shard.first
        self.sp = comm.sp_size
        self.sp_comm = sp_comm
        self._local_rope = rope
        self.rope = self._local_rope if sp_rope == "local" else self._allgather_rope
        self.start_frame, self.grid, self.theta = start_frame, grid, theta

    # --- tokens -----------------------------------------------------------------------------
    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, L_local, C]: pad the tail to L_pad, keep this rank's slice."""
        s = self.shard_info
        if s.padded != s.total:
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, s.padded - s.total))  # [B, L_pad, C]
        return tokens[:, s.first : s.first + s.length].contiguous()  # every layer sees one layout

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L_local, X] -> [B, L, X]: all-gather along the sequence, drop the padding."""
        parts = self.world.all_gather(x)  # [P, B, L_local, X]
        full = parts.transpose(0, 1).flatten(1, 2)  # [B, L_pad, X]
        return full[:, : self.shard_info.total]

    # --- baseline RoPE: gather, rotate the full chunk with the float64 reference, keep ours ----
    def _allgather_rope(self, x: torch.Tensor) -> torch.Tensor:
        full = self.world.all_gather(x).transpose(0, 1).flatten(1, 2)  # [B, L_pad, H, D]
        frames, rows, cols = self.grid
        full = rope_apply_ref(full, self.start_frame, frames, rows, cols, self.theta)
        return full[:, self.first_token : self.first_token + x.shape[1]]

    # --- attention --------------------------------------------------------------------------
    def _by_destination(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L_local, H, D] -> the view [U(dst), B, L_local, H/U, D]: head group j goes to rank j."""
        return x.unflatten(2, (self.sp, x.shape[2] // self.sp)).movedim(2, 0)

    @staticmethod
    def _tokens_first(blocks: torch.Tensor) -> torch.Tensor:
        """Received [U(src), B, L_local, H/U, D] -> [B, U*L_local, H/U, D], the chunk's tokens in order."""
        return blocks.movedim(0, 1).flatten(1, 2)

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L_local, H, D] -> [B, U*L_local, H/U, D] (sequence- to head-sharded, one tensor: the
        unfused baseline)."""
        if self.sp == 1:  # a ring-only layout: nothing to exchange
            return x
        return self._tokens_first(self.comm.all_to_all(self._by_destination(x)))

    def _to_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """[B, U*L_local, H/U, D] -> [B, L_local, H, D] (head-sharded -> sequence-sharded)."""
        if self.sp == 1:
            return o
        b, seg, hl, d = o.shape
        send = o.view(b, self.sp, seg // self.sp, hl, d).movedim(1, 0)  # [U(dst), B, L_local, H/U, D]
        recv = self.comm.all_to_all(send)  # all_to_all: -> [U(src head group), B, L_local, H/U, D]
        return recv.movedim(0, 2).flatten(2, 3)  # [B, L_local, H, D]

    def _qkv_to_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, L_local, H, D] -> ONE all-to-all -> [U(src), 3, B, L_local, H/U, D].

        The send buffer is written by one strided copy per tensor (stacking, then permuting, moved every
        byte twice)."""
        b, n, h, d = q.shape
        send = q.new_empty((self.sp, 3, b, n, h // self.sp, d))
        for j, x in enumerate((q, k, v)):
            send[:, j].copy_(self._by_destination(x))
        return self.comm.all_to_all(send)

    def _fused_exchange(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's q, k, v [B, L_local, H, D] -> the chunk's, head-sharded: q [B, L_pad, H/U, D] and
        k, v the same or, without padding, [B, U, L_local, H/U, D] blocks (views of the exchange)."""
        recv = self._qkv_to_heads(q, k, v)  # [U(src), 3, B, L_local, H/U, D]
        q = self._tokens_first(recv[:, 0])  # [B, U*L_local, H/U, D] (a copy)
        k, v = recv[:, 1].movedim(0, 1), recv[:, 2].movedim(0, 1)  # [B, U, L_local, H/U, D] views
        if not (self._kv_blocks and self.shard_info.padded == self.shard_info.total):
            k, v = k.flatten(1, 2), v.flatten(1, 2)
        return q, k, v

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Head-sharded attention of the whole chunk: q [B, L_pad, H/P, D]; k, v the same or, without
        padding, [B, P, L_local, H/P, D] blocks; padding is not cached."""
        real = self.shard_info.total
        if k.dim() == 4:
            k, v = k[:, :real], v[:, :real]
        k_win, v_win = self.cache.update(layer, self.slots, k, v)  # [B, S_win, H/P, D]
        out = self.attend(q[:, :real], k_win, v_win)
        if real != q.shape[1]:
            out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, q.shape[1] - real))  # [B, L_pad, H/P, D]
        return out

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sp_comm != "fused":
            q, k, v = self._to_heads(q), self._to_heads(k), self._to_heads(v)
        elif self.sp > 1:  # one all-to-all for q, k and v (a ring-only layout has nothing to exchange)
            q, k, v = self._fused_exchange(q, k, v)
        return self._to_tokens(self._attend(layer, q, k, v))
