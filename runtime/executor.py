"""Executors: one chunk forward of the DiT, with the KV cache and SP collectives the runtime owns.

Every backend (eager here; ONNX Runtime, AOTInductor and TensorRT engines in runtime/engine.py)
exposes the same calls, so the sampler and session never know which one runs:
    use_slot(slot)             -> the stream slot (KV cache + prompt K/V) the next calls act on
    set_prompt(prompt_embeds)  -> computes the cross-attention K/V once per prompt
    reset()                    -> a new stream (cache indices to 0, buffers kept)
    forward(x, t, start_frame) -> flow prediction of one chunk

An executor serves `slots` streams at once (SPState allocates a KV cache per slot): each slot keeps
its own cache and prompt K/V at fixed addresses, and a CUDA graph is captured per (slot, chunk shape,
cache plan), once, and replayed for every later stream in that slot.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from ropesp.config import CacheConfig, ModelConfig
from ropesp.errors import ConfigError
from ropesp.model.wan import CausalWanDiT
from ropesp.runtime.graphs import ChunkGraphs
from ropesp.runtime.runners import ROPE_FORMS, SPState
from ropesp.runtime.sp import Collectives


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
    """Whether set_prompt has run in the current slot (forward needs it)."""
    slots: int
    """Streams it serves at once (KV cache slots)."""

    def use_slot(self, slot: int) -> None: ...

    def set_prompt(self, prompt_embeds: torch.Tensor) -> None: ...

    def reset(self) -> None: ...

    def forward(self, x: torch.Tensor, t: torch.Tensor, start_frame: int) -> torch.Tensor: ...


PROMPT_MAX_ABS = 1e4
"""Largest magnitude a prompt embedding may hold: far above any text encoder's output, far below what
overflows the cross-attention's bf16/fp32 activations (1e30 gave NaN latents)."""


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
    peak = float(prompt_embeds.abs().max())
    if peak > PROMPT_MAX_ABS:
        raise ConfigError(
            f"prompt embeddings reach {peak:.3g} in magnitude; a text encoder's output stays within "
            f"+-{PROMPT_MAX_ABS:g} (umT5's within +-100), and such values overflow the model's activations"
        )
    return prompt_embeds


def attention_priority(device: torch.device):
    """SDPA backend order for a forward: cuDNN first on CUDA (measured fastest for these shapes on
    Hopper, docs/PLATFORM.md: 0.28 ms vs 0.49 ms flash at 4680 x 4680), then flash, efficient, math;
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


WARM_TOKENS = 128
"""Tokens of the warm-up attention: a shape every SDPA backend takes."""


def warm_device_libraries(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int) -> None:
    """First use of cuBLAS and cuDNN's attention on device at a tiny shape ([1, WARM_TOKENS, heads,
    head_dim]): their libraries load and their handles are made, which a fresh process otherwise pays
    at its first prompt (the cross-attention K/V's GEMMs: 0.3 s on an H200) and first chunk. Meant for
    another thread while the weights load. cuDNN's attention plans and cuBLAS's handles are per
    thread, so what it saves the DiT's thread is the libraries' loading and their kernels' first
    loading, not the plans: side by side on an H200 (bench/RESULTS.md twelfth session) fresh engine
    processes reached their first chunk 0.26 and 0.47 s sooner with it than without. The global SDPA
    priority (attention_priority) is left alone, so cuDNN's op is called by name. No-op off CUDA."""
    if device.type != "cuda":
        return
    with torch.inference_mode(), torch.cuda.device(device):
        x = torch.zeros(1, heads, WARM_TOKENS, head_dim, device=device, dtype=dtype)  # [B, H, L, D]
        torch.nn.functional.linear(x[0, 0], x[0, 0])  # cuBLAS
        try:
            torch.ops.aten._scaled_dot_product_cudnn_attention(x, x, x, None, False)
        except RuntimeError:  # no cuDNN attention here: the forwards pick another backend
            pass
        torch.cuda.synchronize(device)


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
        self._cross_kv: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * state.slots
        """Per slot, the prompt's cross-attention K/V per layer [B, text_len, H, D]."""
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
    def slots(self) -> int:
        return self.state.slots

    @property
    def slot(self) -> int:
        return self.state.slot

    def use_slot(self, slot: int) -> None:
        """The next set_prompt / reset / forward act on stream slot `slot`."""
        self.state.use_slot(slot)

    @property
    def cross_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """The current slot's cross-attention K/V."""
        return self._cross_kv[self.state.slot]

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
        slot = self.state.slot
        with torch.inference_mode(), self._on_stream(), attention_priority(self.device):
            self._cross_kv[slot], moved = refresh_cross_kv(self._cross_kv[slot], self.model.cross_kv(pe))
        if moved:  # the slot's graphs read the old buffers
            self.graphs.clear(lambda key: key[0] == slot)

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
        stream = self.model.uses_stream_blocks(start_frame)

        def chunk(x: torch.Tensor, t_sin: torch.Tensor) -> torch.Tensor:
            return self._chunk(runner, frames, x, t_sin, stream)

        with torch.inference_mode(), self._on_stream(), attention_priority(self.device):
            # one CUDA graph per cache slot plan and weight set; None (graphs off, or no static plan)
            # runs uncaptured
            plan = runner.graph_key if self.cuda_graphs else None
            key = None if plan is None else (self.state.slot, frames, stream, *plan)
            flow = chunk(x, t_sin) if key is None else self.graphs.run(key, chunk, x, t_sin)
        self.state.commit(runner)
        return self._hand_over(flow)

    def _check_frames(self, frames: int) -> None:
        """Raise where this executor cannot run chunks of `frames` latent frames."""

    def _inputs(self, x: torch.Tensor, t_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's inputs on the device: latents [B, F, C, H, W], sinusoid [B, F, freq_dim]."""
        return x.to(self.device), t_sin

    def _chunk(self, runner, frames: int, x: torch.Tensor, t_sin: torch.Tensor, stream: bool) -> torch.Tensor:
        """One chunk's flow [B, F, C, H, W] float32; stream: with the model's stream blocks."""
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

    def _chunk(self, runner, frames: int, x: torch.Tensor, t_sin: torch.Tensor, stream: bool) -> torch.Tensor:
        return self.model(x, t_sin, self.cross_kv, runner, stream)


def compile_regions(model: CausalWanDiT) -> None:
    """Regional torch.compile of the model in place: one compiled region per block method (shared by
    all layers and both weight sets: Dynamo traces the parameters as inputs) and one for the head."""
    for block in [*model.blocks, *(model.stream_blocks or ())]:
        for name in ("pre_attention", "post_attention"):
            setattr(block, name, torch.compile(getattr(block, name), fullgraph=True, dynamic=False))
    model.head.compile(fullgraph=True, dynamic=False)
