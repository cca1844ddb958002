"""Executors: one chunk forward of the DiT, with the KV cache and SP collectives the runtime owns.

Every backend (eager here; ONNX Runtime, AOTInductor and TensorRT engines in runtime/engine.py)
exposes the same three calls, so the sampler and session never know which one runs:
    set_prompt(prompt_embeds)  -> computes the cross-attention K/V once per prompt
    reset()                    -> a new stream (cache indices to 0, buffers kept)
    forward(x, t, start_frame) -> flow prediction of one chunk
"""

from __future__ import annotations

from typing import Protocol

import torch
from ropesp.runtime.dist import Mapping, check_sp_size
from ropesp.runtime.sp import SP_COMM_MODES, SP_ROPE_MODES, Collectives, TokenShard, UlyssesRunner

from ropesp.config import CacheConfig, ModelConfig, VideoGeometry
from ropesp.errors import ConfigError
from ropesp.model.kv_cache import KVCache
from ropesp.model.local import LocalRunner, make_rope
from ropesp.model.rope import RopeTables
from ropesp.model.wan import CausalWanDiT, timestep_sinusoid


class Executor(Protocol):
    cfg: ModelConfig
    device: torch.device

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
    return prompt_embeds


def sinusoid_for(cfg: ModelConfig, t: torch.Tensor, batch: int, frames: int, device) -> torch.Tensor:
    """The runtime's timestep sinusoid: t (scalar float32) -> [B, F, freq_dim] float64 on device."""
    t_frames = t.reshape(1).to(torch.float32).expand(batch * frames)
    return timestep_sinusoid(t_frames, cfg.freq_dim).view(batch, frames, -1).to(device)


class SPState:
    """What every executor of a P-rank group shares: cache, shard, RoPE tables, collectives."""

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
        group=None,
    ) -> None:
        check_sp_size(cfg.num_heads, mapping.world_size)
        if sp_rope not in SP_ROPE_MODES:
            raise ConfigError(f"--sp-rope {sp_rope!r}; choose one of {SP_ROPE_MODES}")
        if sp_comm not in SP_COMM_MODES:
            raise ConfigError(f"--sp-comm {sp_comm!r}; choose one of {SP_COMM_MODES}")
        self.cfg, self.geometry, self.mapping = cfg, geometry, mapping
        self.device, self.dtype, self.batch = device, dtype, batch
        self.sp_rope, self.sp_comm = sp_rope, sp_comm
        self.cache = KVCache(
            cfg.num_layers,
            batch,
            geometry.frame_tokens,
            cache_cfg,
            cfg.num_heads // mapping.world_size,
            cfg.head_dim,
            dtype,
            device,
        )
        self.tables = RopeTables(
            cfg.head_dim, max(cache_cfg.max_frames, 1), geometry.rows, geometry.cols, cfg.rope_theta, device
        )
        self.comm = Collectives(group, mapping.world_size) if mapping.world_size > 1 else None

    def ensure_frames(self, end_frame: int) -> None:
        """Grow the time axis of the RoPE tables (host-side, rare) for unbounded rolling streams."""
        if end_frame > self.tables.max_frames:
            size = max(end_frame, 2 * self.tables.max_frames)
            self.tables = RopeTables(
                self.cfg.head_dim,
                size,
                self.geometry.rows,
                self.geometry.cols,
                self.cfg.rope_theta,
                self.device,
            )

    def runner(self, slots, start_frame: int, frames: int, rope_fn=None):
        """The ChunkRunner of this rank for one forward; rope_fn overrides the local RoPE."""
        g = self.geometry
        total = frames * g.frame_tokens
        if self.mapping.world_size == 1:
            mode = "tables" if self.sp_rope == "local" else "reference"
            rope = rope_fn or make_rope(
                mode, start_frame, frames, g.rows, g.cols, 0, self.tables, self.cfg.rope_theta
            )
            return LocalRunner(self.cache, slots, rope)
        shard = TokenShard.split(total, self.mapping.world_size, self.mapping.rank)
        rope = rope_fn or make_rope(
            "tables", start_frame, frames, g.rows, g.cols, shard.first, self.tables, self.cfg.rope_theta
        )
        return UlyssesRunner(
            self.cache,
            slots,
            shard,
            self.comm,
            rope,
            sp_rope=self.sp_rope,
            sp_comm=self.sp_comm,
            start_frame=start_frame,
            grid=(frames, g.rows, g.cols),
            theta=self.cfg.rope_theta,
        )


class EagerExecutor:
    """The eager PyTorch model driven chunk by chunk (single rank or Ulysses SP)."""

    def __init__(self, model: CausalWanDiT, state: SPState) -> None:
        self.model = model
        self.state = state
        self.cfg = model.cfg
        self.device = state.device
        self.cross_kv: list | None = None

    @property
    def cache(self) -> KVCache:
        return self.state.cache

    def set_prompt(self, prompt_embeds: torch.Tensor) -> None:
        pe = check_prompt_embeds(self.cfg, prompt_embeds).to(self.device)
        with torch.inference_mode():
            self.cross_kv = self.model.cross_kv(pe)

    def reset(self) -> None:
        self.state.cache.reset()

    def forward(self, x: torch.Tensor, t: torch.Tensor, start_frame: int) -> torch.Tensor:
        """x: [B, F, C, H, W] float32; t: scalar timestep; returns flow [B, F, C, H, W] float32."""
        if self.cross_kv is None:
            raise RuntimeError("set_prompt() must be called before forward()")
        b, frames = x.shape[:2]
        st = self.state
        st.ensure_frames(start_frame + frames)
        ft = st.geometry.frame_tokens
        slots = st.cache.begin(start_frame * ft, frames * ft)
        runner = st.runner(slots, start_frame, frames)
        with torch.inference_mode():
            flow = self.model(
                x.to(self.device), sinusoid_for(self.cfg, t, b, frames, self.device), self.cross_kv, runner
            )
        st.cache.commit(slots)
        return flow
