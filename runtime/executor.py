"""Executors: one chunk forward of the DiT, with the KV cache and SP collectives the runtime owns.

Every backend (eager here; ONNX Runtime, AOTInductor and TensorRT engines in runtime/engine.py)
exposes the same three calls, so the sampler and session never know which one runs:
    set_prompt(prompt_embeds)  -> computes the cross-attention K/V once per prompt
    reset()                    -> a new stream (cache indices to 0, buffers kept)
    forward(x, t, start_frame) -> flow prediction of one chunk
"""

from __future__ import annotations

import contextlib
import functools
from typing import Protocol

import torch

from ropesp.config import CacheConfig, ModelConfig, VideoGeometry
from ropesp.errors import ConfigError, arg
from ropesp.model.kv_cache import KVCache
from ropesp.model.rope import RopeGrid
from ropesp.model.wan import CausalWanDiT, timestep_sinusoid
from ropesp.parallel import SPLayout, TokenShard
from ropesp.plugins.attention_8bit import select_attention
from ropesp.runtime.dist import Mapping
from ropesp.runtime.graphs import ChunkGraphs
from ropesp.runtime.ring import RingCache, ring_capacity, ulysses_group
from ropesp.runtime.runners import (
    CacheAttention,
    RingAttention,
    SingleDeviceRunner,
    UlyssesRunner,
    allgather_rope,
)
from ropesp.runtime.sp import SP_COMM_MODES, SP_ROPE_MODES, Collectives


class Executor(Protocol):
    """What the session, the group and bench use of an executor."""

    cfg: ModelConfig
    device: torch.device
    cuda_graphs: bool
    """Whether forwards replay CUDA graphs (the host then runs ahead of the device)."""
    world_size: int
    """Ranks that run every forward in lock-step."""
    comm: Collectives | None
    """The collectives this rank's forwards use (None on one rank); bench times them."""
    cache_cfg: CacheConfig | None
    """The KV cache's geometry (None: no cache, so no re-cache on a prompt switch)."""
    has_prompt: bool
    """Whether set_prompt has run (forward needs it)."""

    def set_prompt(self, prompt_embeds: torch.Tensor) -> None: ...

    def reset(self) -> None: ...

    def forward(self, x: torch.Tensor, t: torch.Tensor, start_frame: int) -> torch.Tensor: ...


def check_prompt_embeds(cfg: ModelConfig, prompt_embeds: torch.Tensor) -> torch.Tensor:
    """Accept [L, text_dim] or [B, L, text_dim] with L <= text_len; returns [B, L, text_dim]."""
    if prompt_embeds.dim() == 2:
        prompt_embeds = prompt_embeds.unsqueeze(0)
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != cfg.text_dim:
        raise ConfigError(
            f"prompt embeddings have shape {tuple(prompt_embeds.shape)}; expected [L, {cfg.text_dim}] "
            f"or [1, L, {cfg.text_dim}] (text_dim of the model)"
        )
    if not 1 <= prompt_embeds.shape[1] <= cfg.text_len:
        raise ConfigError(
            f"prompt embeddings have {prompt_embeds.shape[1]} tokens; the model takes 1..{cfg.text_len} "
            "(shorter ones are zero-padded)"
        )
    if not prompt_embeds.is_floating_point():
        raise ConfigError(f"prompt embeddings must be floating point, got {prompt_embeds.dtype}")
    if not torch.isfinite(prompt_embeds).all():  # one host sync per prompt, not per chunk
        bad = int((~torch.isfinite(prompt_embeds)).sum())
        raise ConfigError(f"prompt embeddings hold {bad} NaN or Inf values; every value must be finite")
    return prompt_embeds


def sinusoid_for(cfg: ModelConfig, t: torch.Tensor, batch: int, frames: int, device) -> torch.Tensor:
    """The runtime's timestep sinusoid: t (scalar float32) -> [B, F, freq_dim] float64 on device."""
    t_frames = t.reshape(1).to(torch.float32).expand(batch * frames)
    return timestep_sinusoid(t_frames, cfg.freq_dim).view(batch, frames, -1).to(device)


def attention_priority(device: torch.device):
    """SDPA backend order for a forward: cuDNN first on CUDA (measured fastest for these shapes on
    Hopper, ENVIRONMENT.md: 0.28 ms vs 0.49 ms flash at 4680 x 4680), then flash, efficient, math;
    SDPA falls back along the list where a backend cannot take a shape. No-op off CUDA."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ]
    return sdpa_kernel(order, set_priority=True)


def refresh_cross_kv(buffers: list | None, kv: list) -> tuple[list, bool]:
    """A new prompt's cross-attention K/V [B, text_len, H, D] per layer, copied into the previous
    prompt's buffers when the shapes match (CUDA graphs and bound engine addresses keep reading them);
    returns (buffers, True if they are new tensors)."""
    if buffers is not None and [k.shape for k, _ in buffers] == [k.shape for k, _ in kv]:
        for (k_buf, v_buf), (k, v) in zip(buffers, kv):
            k_buf.copy_(k)
            v_buf.copy_(v)
        return buffers, False
    return [(k.contiguous(), v.contiguous()) for k, v in kv], True


ROPE_FORMS = ("op", "reference", "engine")
"""How a runner rotates q/k: `op` the ropesp::rope_sp op reading the device start_frame (CUDA, compiled
regions: one graph for every chunk position), `reference` its pure-torch math (eager on the CPU),
`engine` not at all (an engine's pre segment applies it)."""


def _rope_in_engine(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("engines apply Causal-RoPE SP inside the pre segment")


class SPState:
    """What the executor of one rank of a P-rank group keeps between forwards: cache, collectives,
    the device start_frame, the timestep sinusoids; `begin` plans a forward and returns its runner.

    Pure Ulysses (ring degree 1) keeps a head-sharded KVCache; the hybrid layout (runtime/ring.py)
    keeps a head- and token-sharded RingCache. The choice is made once, here: `begin` / `commit` take
    the same arguments for both, and the runner composes the matching cache attention (runtime/runners.py).
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
    ) -> None:
        """attention: the self-attention kernel over the cache, a mode of plugins/attention_8bit.py
        (sdpa | fa3 | fp8 | int8); the hybrid (ring) layout merges partial attentions and takes sdpa only.
        comm: this rank's collectives over the whole world (default: Collectives over the default
        group); tests and bench hand in theirs (an observer, or bench's AloneCollectives)."""
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
        if layout.ring == 1:
            self.cache = KVCache(
                cfg.num_layers, batch, ft, cache_cfg, local_heads, cfg.head_dim, dtype, device
            )
            self._cache_attention = functools.partial(CacheAttention, attend=self.attend)
        else:
            chunks = chunk_frames or [cache_cfg.slot_frames]
            local_len = -(-max(chunks) * ft // mapping.world_size)
            capacity = ring_capacity(cache_cfg, ft, chunks, layout.ulysses * local_len)
            self.cache = RingCache(
                layout, mapping.rank, cfg.num_layers, batch, ft, cache_cfg, capacity, local_heads,
                cfg.head_dim, dtype, device,
            )  # fmt: skip
            self._cache_attention = functools.partial(RingAttention, world=self.comm)
            self.ulysses_comm = self.comm.with_group(ulysses_group(layout, mapping.rank), layout.ulysses)

    def sinusoid(self, t: torch.Tensor | float, batch: int, frames: int) -> torch.Tensor:
        """The timestep sinusoid [B, F, freq_dim] float64 on device, computed once per distinct step
        (a host-to-device copy per forward would stall the host behind the GPU)."""
        key = (float(t), batch, frames)
        if key not in self._sinusoids:
            self._sinusoids[key] = sinusoid_for(self.cfg, torch.tensor(key[0]), batch, frames, self.device)
        return self._sinusoids[key]

    def reset(self) -> None:
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


class ChunkExecutor:
    """What every executor shares: the model (text path and weights), the SP state, the prompt's
    cross-attention K/V in fixed buffers, the side stream (CUDA), the chunk CUDA graphs and the
    forward itself; a backend supplies `_chunk` (and `_inputs`)."""

    def __init__(
        self, model: CausalWanDiT, state: SPState, *, side_stream: bool, cuda_graphs: bool, rope: str
    ) -> None:
        """rope: how the runners rotate q/k, one of ROPE_FORMS."""
        assert rope in ROPE_FORMS, rope
        self.model, self.state, self.rope = model, state, rope
        self.cfg, self.device, self.dtype = model.cfg, state.device, state.dtype
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        cuda = self.device.type == "cuda"
        self.cuda_graphs = cuda_graphs and cuda
        # graphs cannot be captured on the legacy default stream
        self.stream = torch.cuda.Stream(self.device) if cuda and (side_stream or self.cuda_graphs) else None
        self.graphs = ChunkGraphs(self.stream)

    @property
    def cache(self):
        return self.state.cache

    @property
    def cache_cfg(self) -> CacheConfig:
        return self.state.cache_cfg

    @property
    def world_size(self) -> int:
        return self.state.mapping.world_size

    @property
    def comm(self) -> Collectives | None:
        return self.state.comm

    @property
    def has_prompt(self) -> bool:
        return self.cross_kv is not None

    @contextlib.contextmanager
    def _on_stream(self):
        """Run on the executor's stream (if any), ordered after and before the caller's stream."""
        if self.stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    def _hand_over(self, flow: torch.Tensor) -> torch.Tensor:
        """flow was made on our stream and is used on the caller's: keep its memory until then."""
        if self.stream is not None:
            flow.record_stream(torch.cuda.current_stream(self.device))
        return flow

    def set_prompt(self, prompt_embeds: torch.Tensor) -> None:
        pe = check_prompt_embeds(self.cfg, prompt_embeds).to(self.device)
        with torch.inference_mode(), self._on_stream(), attention_priority(self.device):
            self.cross_kv, moved = refresh_cross_kv(self.cross_kv, self.model.cross_kv(pe))
        if moved:
            self.graphs.clear()

    def reset(self) -> None:
        self.state.reset()

    def forward(self, x: torch.Tensor, t: torch.Tensor, start_frame: int) -> torch.Tensor:
        """x: [B, F, C, H, W] float32; t: scalar timestep; returns flow [B, F, C, H, W] float32."""
        if self.cross_kv is None:
            raise RuntimeError("set_prompt() must be called before forward()")
        b, frames = x.shape[:2]
        self._check_frames(frames)
        runner = self.state.begin(start_frame, frames, self.rope)
        x, t_sin = self._inputs(x, self.state.sinusoid(t, b, frames))

        def chunk(x: torch.Tensor, t_sin: torch.Tensor) -> torch.Tensor:
            return self._chunk(runner, frames, x, t_sin)

        with torch.inference_mode(), self._on_stream(), attention_priority(self.device):
            # one CUDA graph per cache slot plan; None (graphs off, or no static plan) runs uncaptured
            plan = runner.graph_key if self.cuda_graphs else None
            flow = chunk(x, t_sin) if plan is None else self.graphs.run((frames, *plan), chunk, x, t_sin)
        self.state.commit(runner)
        return self._hand_over(flow)

    def _check_frames(self, frames: int) -> None:
        """Raise where this executor cannot run chunks of `frames` latent frames."""

    def _inputs(self, x: torch.Tensor, t_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's inputs on the device: latents [B, F, C, H, W], sinusoid [B, F, freq_dim]."""
        return x.to(self.device), t_sin

    def _chunk(self, runner, frames: int, x: torch.Tensor, t_sin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EagerExecutor(ChunkExecutor):
    """The PyTorch model driven chunk by chunk (single rank, Ulysses or hybrid SP).

    compile: regional torch.compile (the `compile` backend): each block's pre- and post-attention
    and the head become Inductor graphs, traced once and shared by every layer (the weights are graph
    inputs), with Causal-RoPE SP as the `ropesp::rope_sp` op reading start_frame from
    a device scalar, so no chunk position recompiles. The runner's collectives, cache writes and
    attention stay between the regions, as in the engine segments (export/segments.py).
    cuda_graphs (CUDA only): each chunk forward is captured once per cache slot plan and replayed.
    """

    def __init__(
        self, model: CausalWanDiT, state: SPState, *, compile: bool = False, cuda_graphs: bool = False
    ) -> None:
        # the op on GPU (the Triton kernel) and under compile (one graph for every chunk position)
        rope = "op" if compile or state.device.type == "cuda" else "reference"
        super().__init__(model, state, side_stream=False, cuda_graphs=cuda_graphs, rope=rope)
        if compile:
            compile_regions(model)

    def _chunk(self, runner, frames: int, x: torch.Tensor, t_sin: torch.Tensor) -> torch.Tensor:
        return self.model(x, t_sin, self.cross_kv, runner)


def compile_regions(model: CausalWanDiT) -> None:
    """Regional torch.compile of the model in place: one compiled region per block method (shared by
    all layers: Dynamo traces the parameters as inputs) and one for the head."""
    for block in model.blocks:
        for name in ("pre_attention", "post_attention"):
            setattr(block, name, torch.compile(getattr(block, name), fullgraph=True, dynamic=False))
    model.head.compile(fullgraph=True, dynamic=False)
