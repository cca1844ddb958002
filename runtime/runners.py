"""Chunk runners: how one chunk forward of the DiT reaches its tokens, peers and KV cache, per SP layout.

The model asks a runner (the `ChunkRunner` protocol of ropesp/model/wan.py) which tokens this rank holds,
how q/k are rotated, how attention reaches the cache and how the head's output is gathered:

    SingleDeviceRunner  one rank holds every token and head: identity shard/gather
    UlyssesRunner       P ranks: this rank's L/P tokens, RoPE on them, one all-to-all to the head-sharded
                        layout, attention, one all-to-all back (Causal-RoPE SP: nothing gathered for RoPE)

What attention reads is a cache attention the runner holds (composition, not subclasses):

    CacheAttention      a head-sharded KVCache holding the whole chunk's tokens (one rank, pure Ulysses)
    RingAttention       a RingCache shard holding the Ulysses group's token segment; the ring peers'
                        shards stream in and partial results merge by log-sum-exp (runtime/ring.py)

`SPState` is one rank's state between forwards (cache, collectives, the device start_frame): it chooses
the cache kind and the runner once, and `begin` hands each forward its runner.

Baselines kept for measurement (docs/ARCHITECTURE.md, Causal-RoPE SP): `allgather_rope` gathers q and k to the full chunk and applies
the reference float64 RoPE there; `sp_comm="unfused"` sends q, k and v in three all-to-alls. All modes
produce the same outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ropesp.config import CacheConfig, ModelConfig, VideoGeometry
from ropesp.errors import ConfigError, arg
from ropesp.model.kv_cache import CacheSlots, KVCache, attention
from ropesp.model.rope import RopeGrid, rope_apply_ref
from ropesp.model.wan import timestep_sinusoid
from ropesp.parallel import SPLayout, TokenShard
from ropesp.plugins.attention_8bit import kv_cache_class, select_attention
from ropesp.runtime.dist import Mapping
from ropesp.runtime.ring import (
    RingCache,
    RingSlots,
    attention_lse,
    merge_partials,
    ring_capacity,
    ulysses_group,
)
from ropesp.runtime.sp import SP_COMM_MODES, SP_ROPE_MODES, Collectives

Rope = Callable[[torch.Tensor], torch.Tensor]
"""x [B, L_local, H, D] -> rotated x, this rank's tokens."""


def all_gather_tokens(world: Collectives | None, x: torch.Tensor) -> torch.Tensor:
    """[B, L_local, X] -> [B, L_pad, X]: every rank's tokens in order, padding kept (world None: one rank)."""
    if world is None:
        return x
    return world.all_gather(x).transpose(0, 1).flatten(1, 2)  # [P, B, L_local, X] -> [B, L_pad, X]


def allgather_rope(grid: RopeGrid, start_frame: int, world: Collectives | None) -> Rope:
    """The baseline RoPE: gather the full chunk, rotate it with the float64 reference (the upstream
    formulation), keep this rank's tokens [first_token, first_token + L_local)."""
    first = grid.first_token

    def rope(x: torch.Tensor) -> torch.Tensor:
        full = all_gather_tokens(world, x)  # [B, L_pad, H, D]
        full = rope_apply_ref(full, start_frame, grid.frames, grid.rows, grid.cols, grid.theta)
        return full[:, first : first + x.shape[1]]

    return rope


# --- what attention reads ------------------------------------------------------------------------
class CacheAttention:
    """The chunk's queries against a KVCache window holding every token of the chunk (this rank's heads)."""

    kv_blocks = True
    """Keys and values may arrive as the exchange's [B, U, L_local, H/U, D] blocks (one copy fewer)."""

    def __init__(
        self, cache: KVCache, slots: CacheSlots, shard: TokenShard | None = None, *, attend=attention
    ) -> None:
        """shard: this rank's tokens of the chunk (the rest of q, k, v is SP padding, not cached; None:
        every token is real); attend(q, k, v) -> out, [B, L, H, D] each: the attention kernel
        (plugins/attention_8bit.py)."""
        self.cache, self.slots, self.attend = cache, slots, attend
        self.tokens = None if shard is None else shard.total

    @property
    def graph_key(self) -> tuple[int, int, int, int]:
        """The slot plan a CUDA graph of this forward is captured for (static per plan)."""
        s = self.slots
        return (s.write_start, s.write_end, s.attn_start, s.attn_end)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, L_pad, H, D]; k, v the same or, without padding, [B, U, L_local, H, D] blocks.
        Returns [B, L_pad, H, D]."""
        real = q.shape[1] if self.tokens is None else self.tokens
        if k.dim() == 4:
            k, v = k[:, :real], v[:, :real]
        k_win, v_win = self.cache.update(layer, self.slots, k, v)  # [B, S_win, H, D]
        out = self.attend(q[:, :real], k_win, v_win)
        if real != q.shape[1]:
            out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, q.shape[1] - real))  # [B, L_pad, H, D]
        return out


class RingAttention:
    """The Ulysses group's segment of queries against every ring peer's cache shard (hybrid layout)."""

    kv_blocks = False  # the ring cache's writes take flat tokens
    graph_key = None  # the shards' lengths change with the stream: no static slot plan to capture

    def __init__(self, ring: RingCache, slots: RingSlots, shard: TokenShard, *, world: Collectives) -> None:
        """world: the collectives spanning every rank (the ring steps address global ranks)."""
        self.ring, self.slots, self.world = ring, slots, world
        s0, s1 = ring.segment(ring.ring_index, shard.length, shard.total)
        self.segment_tokens = s1 - s0

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, U*L_local, H/U, D] of this group's segment (the tail may be SP padding)."""
        real = self.segment_tokens
        rs = self.slots
        ck, cv = self.ring.k[layer], self.ring.v[layer]
        ck[:, rs.write_start : rs.window_end] = k[:, :real]
        cv[:, rs.write_start : rs.window_end] = v[:, :real]
        k_own, v_own = ck[:, : rs.window_end], cv[:, : rs.window_end]
        layout = self.ring.layout
        me, u = self.ring.ring_index, self.ring.u
        nxt, prv = layout.rank_of(me + 1, u), layout.rank_of(me - 1, u)
        cur = torch.stack((k_own, v_own)) if layout.ring > 1 else None  # [2, B, S_own, H/U, D]
        parts = []
        for step in range(layout.ring):
            pending = None
            if step + 1 < layout.ring:  # the next shard travels while this one is attended to
                src = (me - step - 1) % layout.ring
                recv = cur.new_empty((2, cur.shape[1], rs.peer_lengths[src], *cur.shape[3:]))
                pending = self.world.ring_shift_start(cur, recv, nxt, prv)
            k_s, v_s = (k_own, v_own) if step == 0 else (cur[0], cur[1])
            if k_s.shape[1]:
                parts.append(attention_lse(q, k_s, v_s))
            if pending is not None:
                self.world.ring_shift_wait(pending)
                cur = recv
        return merge_partials(parts) if len(parts) > 1 else parts[0][0]


# --- the runners ---------------------------------------------------------------------------------
class SingleDeviceRunner:
    """ChunkRunner for one device: identity shard/gather, cache write + attention over the window."""

    first_token = 0

    def __init__(self, cache: KVCache, slots: CacheSlots, rope: Rope | None, attend=attention) -> None:
        """attend(q, k, v) -> out, all [B, L, H, D]: the attention kernel (default SDPA)."""
        self.rope = rope
        self.cache_attention = CacheAttention(cache, slots, attend=attend)
        self.slots = slots

    @property
    def graph_key(self) -> tuple | None:
        return self.cache_attention.graph_key

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.cache_attention(layer, q, k, v)


class UlyssesRunner:
    """ChunkRunner of one rank in a Ulysses group (P >= 2), over a CacheAttention or a RingAttention.

    `comm` spans the Ulysses group (the all-to-alls); `world` spans every rank of the chunk (the head's
    all-gather); they are the same group in pure Ulysses.
    """

    def __init__(
        self,
        shard: TokenShard,
        comm: Collectives,
        rope: Rope,
        cache_attention: CacheAttention | RingAttention,
        slots,
        *,
        world: Collectives | None = None,
        sp_comm: str = "fused",
    ) -> None:
        """slots: the cache plan of this forward (SPState.commit takes it back)."""
        self.shard_info, self.comm, self.cache_attention, self.slots = shard, comm, cache_attention, slots
        self.world = world or comm
        self.first_token = shard.first
        self.sp = comm.sp_size
        self.sp_comm = sp_comm
        self.rope = rope

    @property
    def graph_key(self) -> tuple | None:
        return self.cache_attention.graph_key

    # --- tokens -----------------------------------------------------------------------------
    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, L_local, C]: pad the tail to L_pad, keep this rank's slice."""
        s = self.shard_info
        if s.padded != s.total:
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, s.padded - s.total))  # [B, L_pad, C]
        return tokens[:, s.first : s.first + s.length].contiguous()  # every layer sees one layout

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L_local, X] -> [B, L, X]: all-gather along the sequence, drop the padding."""
        return all_gather_tokens(self.world, x)[:, : self.shard_info.total]

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
        if not (self.cache_attention.kv_blocks and self.shard_info.padded == self.shard_info.total):
            k, v = k.flatten(1, 2), v.flatten(1, 2)
        return q, k, v

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sp_comm != "fused":
            q, k, v = self._to_heads(q), self._to_heads(k), self._to_heads(v)
        elif self.sp > 1:  # one all-to-all for q, k and v (a ring-only layout has nothing to exchange)
            q, k, v = self._fused_exchange(q, k, v)
        return self._to_tokens(self.cache_attention(layer, q, k, v))


# --- one rank's state: the cache, collectives and runner of each forward ---------------------
ROPE_FORMS = ("op", "reference", "engine")
"""How a runner rotates q/k: `op` the ropesp::rope_sp op reading the device start_frame (CUDA, compiled
regions: one graph for every chunk position), `reference` its pure-torch math (eager on the CPU),
`engine` not at all (an engine's pre segment applies it)."""


def _rope_in_engine(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("engines apply Causal-RoPE SP inside the pre segment")


def sinusoid_for(cfg: ModelConfig, t: torch.Tensor, batch: int, frames: int, device) -> torch.Tensor:
    """The runtime's timestep sinusoid: t (scalar float32) -> [B, F, freq_dim] float64 on device."""
    t_frames = t.reshape(1).to(torch.float32).expand(batch * frames)
    return timestep_sinusoid(t_frames, cfg.freq_dim).view(batch, frames, -1).to(device)


class SPState:
    """What the executor of one rank of a P-rank group keeps between forwards: cache, collectives,
    the device start_frame, the timestep sinusoids; `begin` plans a forward and returns its runner.

    Pure Ulysses (ring degree 1) keeps a head-sharded KVCache; the hybrid layout (runtime/ring.py)
    keeps a head- and token-sharded RingCache. The choice is made once, here: `begin` / `commit` take
    the same arguments for both, and the runner composes the matching cache attention (above).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        geometry: VideoGeometry,
        cache_cfg: CacheConfig,
        mapping: Mapping,
        device: torch.device,
        dtype: torch.dtype,
        *,
        batch: int = 1,
        sp_rope: str = "local",
        sp_comm: str = "fused",
        comm: Collectives | None = None,
        layout: SPLayout | None = None,
        chunk_frames: list[int] | None = None,
        attention: str = "sdpa",
        slots: int = 1,
    ) -> None:
        """attention: the self-attention kernel over the cache, a mode of plugins/attention_8bit.py
        (sdpa | fa3 | fp8 | int8); the hybrid (ring) layout merges partial attentions and takes sdpa only.
        comm: this rank's collectives over the whole world (default: Collectives over the default
        group); tests and bench hand in theirs (an observer, or bench's AloneCollectives).
        slots: KV caches allocated here, one per stream served at once; `use_slot` picks the one the
        next forwards read and write."""
        layout = layout or SPLayout.choose(cfg.num_heads, mapping.world_size, ring=1)
        if layout.world_size != mapping.world_size:
            raise ConfigError(f"SP layout {layout} does not match the world size {mapping.world_size}")
        if sp_rope not in SP_ROPE_MODES:
            raise ConfigError(f"{arg('sp_rope', sp_rope)}; choose one of {SP_ROPE_MODES}")
        if sp_comm not in SP_COMM_MODES:
            raise ConfigError(f"{arg('sp_comm', sp_comm)}; choose one of {SP_COMM_MODES}")
        if attention != "sdpa" and layout.ring > 1:
            raise ConfigError(
                f"--attention {attention} runs with pure Ulysses or one rank; the ring layout {layout} "
                "merges partial attentions (log-sum-exp) that only --attention sdpa returns"
            )
        self.cfg, self.geometry, self.mapping, self.layout = cfg, geometry, mapping, layout
        self.cache_cfg = cache_cfg
        self.device, self.dtype, self.batch = device, dtype, batch
        self.sp_rope, self.sp_comm = sp_rope, sp_comm
        self.attend = select_attention(attention)
        self.start_frame = torch.zeros(1, dtype=torch.int32, device=device)
        """The chunk's start_frame, int32 [1] on the device: one buffer for every forward (CUDA graphs,
        compiled regions and engine bindings read its address), refreshed by `begin`."""
        self._sinusoids: dict[tuple[float, int, int], torch.Tensor] = {}
        if mapping.world_size == 1:
            self.comm = None
        else:
            self.comm = comm if comm is not None else Collectives(None, mapping.world_size)
            if self.comm.sp_size != mapping.world_size:
                raise ConfigError(
                    f"collectives of {self.comm.sp_size} ranks for a world of {mapping.world_size}"
                )
            if not self.comm.needs_peers and layout.ring > 1:
                raise ConfigError(f"a rank alone runs pure Ulysses only, not the layout {layout}")
        self.ulysses_comm = self.comm
        local_heads = cfg.num_heads // layout.ulysses
        ft = geometry.frame_tokens
        if slots < 1:
            raise ConfigError(f"{arg('max_streams', slots)} must be >= 1")
        if layout.ring == 1:

            def make_cache():
                return kv_cache_class(attention)(
                    cfg.num_layers, batch, ft, cache_cfg, local_heads, cfg.head_dim, dtype, device
                )

            self._cache_attention = functools.partial(CacheAttention, attend=self.attend)
        else:
            chunks = chunk_frames or [cache_cfg.slot_frames]
            local_len = -(-max(chunks) * ft // mapping.world_size)
            capacity = ring_capacity(cache_cfg, ft, chunks, layout.ulysses * local_len)

            def make_cache():
                return RingCache(
                    layout, mapping.rank, cfg.num_layers, batch, ft, cache_cfg, capacity, local_heads,
                    cfg.head_dim, dtype, device,
                )  # fmt: skip

            self._cache_attention = functools.partial(RingAttention, world=self.comm)
            self.ulysses_comm = self.comm.with_group(ulysses_group(layout, mapping.rank), layout.ulysses)
        self.caches = [make_cache() for _ in range(slots)]
        """One KV cache per stream slot, allocated once (a finished stream's slot serves the next)."""
        self.slot = 0
        """The slot the next forwards read and write (use_slot)."""

    def sinusoid(self, t: torch.Tensor | float, batch: int, frames: int) -> torch.Tensor:
        """The timestep sinusoid [B, F, freq_dim] float64 on device, computed once per distinct step
        (a host-to-device copy per forward would stall the host behind the GPU)."""
        key = (float(t), batch, frames)
        if key not in self._sinusoids:
            self._sinusoids[key] = sinusoid_for(self.cfg, torch.tensor(key[0]), batch, frames, self.device)
        return self._sinusoids[key]

    @property
    def cache(self):
        """The KV cache of the current slot."""
        return self.caches[self.slot]

    @property
    def slots(self) -> int:
        return len(self.caches)

    def use_slot(self, slot: int) -> None:
        """Read and write the KV cache of `slot` from now on (host-side: no device work)."""
        assert 0 <= slot < len(self.caches), slot
        self.slot = slot

    def reset(self) -> None:
        """A new stream in the current slot."""
        self.cache.reset()

    def begin(self, start_frame: int, frames: int, rope: str) -> SingleDeviceRunner | UlyssesRunner:
        """Plan this forward's cache slots (rolling the window if needed; host-side), set the device
        start_frame and return this rank's runner; rope: how it rotates q/k, one of ROPE_FORMS."""
        g, p = self.geometry, self.mapping
        slots = self.cache.begin(start_frame * g.frame_tokens, frames * g.frame_tokens)
        self.start_frame.fill_(start_frame)  # a device-side fill: no host sync
        shard = TokenShard.split(frames * g.frame_tokens, p.world_size, p.rank)
        grid = RopeGrid(frames, g.rows, g.cols, shard.first, self.cfg.rope_theta)
        if self.sp_rope == "allgather":  # the upstream formulation: float64 RoPE of the full chunk
            rank_rope = allgather_rope(grid, start_frame, self.comm)
        elif rope == "engine":
            rank_rope = _rope_in_engine
        else:
            from ropesp.plugins.rope_sp import rope_for_rank  # Triton, where installed: not for engines

            rank_rope = rope_for_rank(grid, self.start_frame, op=rope == "op")
        if p.world_size == 1:
            return SingleDeviceRunner(self.cache, slots, rank_rope, self.attend)
        attention = self._cache_attention(self.cache, slots, shard)
        return UlyssesRunner(
            shard, self.ulysses_comm, rank_rope, attention, slots, world=self.comm, sp_comm=self.sp_comm
        )

    def commit(self, runner: SingleDeviceRunner | UlyssesRunner) -> None:
        """The forward of runner is done: its tokens are in the cache for the next chunks."""
        self.cache.commit(runner.slots)
