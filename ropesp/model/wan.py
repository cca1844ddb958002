"""CausalWanDiT: the Wan2.1 DiT run chunk by chunk with a KV cache (Self-Forcing inference path).

Attribute names equal the original checkpoint keys (docs/MODEL.md section 1), so a state dict loads
with `load_state_dict(strict=True, assign=True)`.

The model itself is single-device and knows nothing of sequence parallelism, caches or engines: the
per-chunk forward asks a `ChunkRunner` for the four things that differ between execution modes —
which tokens this rank holds, how q/k are rotated, how attention reaches the KV cache, and how the
head's output is gathered. Each block is split into `pre_attention` and `post_attention` so that
exported engines and collectives can sit between them (export/segments.py).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ropesp.config import ModelConfig


class ChunkRunner(Protocol):
    """What one chunk's forward needs from its execution mode (runtime/runners.py)."""

    first_token: int
    """Index of this rank's first token in the chunk."""

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] all tokens -> [B, L_local, C] this rank's tokens (tail padded)."""
        ...

    def rope(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate q or k [B, L_local, H, D] of this rank's tokens."""
        ...

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Self-attention of this rank's queries against the cache: [B, L_local, H, D] each."""
        ...

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L_local, X] -> [B, L, X] all tokens of the chunk (padding dropped)."""
        ...


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal timestep embedding in float64, [cos, sin] order. t: [N] -> [N, dim] float64."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    arg = torch.outer(pos, freqs)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm in fp32, cast back to x's dtype (as Wan's WanLayerNorm)."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).type_as(x)


class Linear(nn.Linear):
    """nn.Linear (same keys and behaviour) that draws no initial weights on the meta device: a shape-only
    model (the engines' container of their weights, checkpoint shape checks) is built in a fresh
    process before its first chunk, where Linear's kaiming draws through the meta device's function
    mode cost ~0.2 s of the 1.3B model's construction on an H200 host (bench/RESULTS.md)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (all heads at once), statistics in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32; affine only when asked (norm3 with cross_attn_norm)."""

    def __init__(self, dim: int, eps: float, affine: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.eps, self.weight, self.bias)


class ModulatedLayerNorm(nn.Module):
    """adaLN: LayerNorm (fp32, no affine of its own) with a shift and scale per frame (Wan's norm1 and
    norm2, no parameters: the tables come from the block's modulation and the time embedding)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, frame_of_token: torch.Tensor
    ) -> torch.Tensor:
        """x [B, L, C]; shift, scale [B, F, C] per frame; frame_of_token [L] int64 -> [B, L, C] in x's
        dtype: layer_norm(x) * (1 + scale[frame]) + shift[frame]."""
        return layer_norm(x, self.eps) * (1 + scale[:, frame_of_token]) + shift[:, frame_of_token]


class FeedForward(nn.Sequential):
    """Linear -> GELU (tanh) -> Linear; keys `0.weight`, `0.bias`, `2.weight`, `2.bias` as Wan's FFN.

    On CUDA the first Linear and the GELU are one cuBLASLt GEMM with a bias + GELU(tanh) epilogue
    (`aten._addmm_activation`), so the [L, ffn_dim] activation (86 MB per layer at 832x480 bf16) is
    written once instead of written, read and written again. The CPU kernel of that op applies the
    erf GELU, so the CPU keeps the two separate ops. (With FP8 weights plugins/fp8_layers.py takes over.)"""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__(Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), Linear(ffn_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, _, down = self
        if not x.is_cuda or type(up) is not Linear:  # a subclass (a training adapter) computes its own
            return super().forward(x)
        h = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
        return down(h.unflatten(0, x.shape[:-1]))


class Attention(nn.Module):
    """q/k/v/o projections with optional RMSNorm (across heads) on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, dim)
        self.k = Linear(dim, dim)
        self.v = Linear(dim, dim)
        self.o = Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # [B, L, H, D]

    def cross_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text keys and values, computed once per prompt: [B, text_len, H, D] each."""
        return self.heads(self.norm_k(self.k(context))), self.heads(self.v(context))


def modulation(rows: int, dim: int) -> nn.Parameter:
    """adaLN modulation table [1, rows, dim], drawn N(0, 1) / sqrt(dim) (the values of
    `torch.randn(1, rows, dim) / dim**0.5`). A shape-only model on the meta device skips the draw: there
    a draw and a division run torch's Python reference kernels, whose first use imports sympy and Dynamo,
    seconds of every process's start-up (checkpoint shape checks build such a model)."""
    table = torch.empty(1, rows, dim)
    if not table.is_meta:
        table.normal_().div_(dim**0.5)
    return nn.Parameter(table)


class Block(nn.Module):
    """Transformer block with per-frame 6-way adaLN (docs/MODEL.md section 3)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = ModulatedLayerNorm(cfg.eps)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = ModulatedLayerNorm(cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.ffn_dim)
        self.modulation = modulation(6, cfg.dim)

    def frame_modulation(self, e0: torch.Tensor) -> torch.Tensor:
        """adaLN parameters per frame: e0 [B, F, 6, C] -> [B, F, 6, C] (shift, scale, gate, x2).

        Each consumer gathers its own [B, L, C] rows (`mod[:, frame_of_token, i]`) instead of one
        [B, L, 6, C] per-token tensor: eager writes only the rows it reads, and Inductor folds the
        gather into the LayerNorm/residual kernels, so the per-token tensor (86 MB per layer at
        832x480 bf16) is never written."""
        return self.modulation.unsqueeze(1) + e0

    def pre_attention(
        self, x: torch.Tensor, e0: torch.Tensor, frame_of_token: torch.Tensor, rope
    ) -> tuple[torch.Tensor, ...]:
        """x: [B, L, C], e0: [B, F, 6, C], frame_of_token: [L] int64 -> q, k (rotated), v: [B, L, H, D]."""
        mod = self.frame_modulation(e0)
        h = self.norm1(x, mod[:, :, 0], mod[:, :, 1], frame_of_token)
        attn = self.self_attn
        q = attn.heads(attn.norm_q(attn.q(h)))  # [B, L, H, D]
        k = attn.heads(attn.norm_k(attn.k(h)))
        v = attn.heads(attn.v(h))
        return rope(q).type_as(v), rope(k).type_as(v), v

    def post_attention(
        self,
        x: torch.Tensor,
        o: torch.Tensor,
        e0: torch.Tensor,
        frame_of_token: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
    ) -> torch.Tensor:
        """x: [B, L, C]; o: [B, L, H, D] attention output; e0: [B, F, 6, C]; frame_of_token: [L];
        cross_k/v: [B, text_len, H, D]."""
        mod = self.frame_modulation(e0)
        x = x + self.self_attn.o(o.flatten(2)) * mod[:, frame_of_token, 2]
        ca = self.cross_attn
        q = ca.heads(ca.norm_q(ca.q(self.norm3(x))))  # [B, L, H, D]
        c = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            cross_k.transpose(1, 2),
            cross_v.transpose(1, 2),  # [B, H, L, D]
        ).transpose(1, 2)  # [B, L, H, D]
        x = x + ca.o(c.flatten(2))
        h = self.norm2(x, mod[:, :, 3], mod[:, :, 4], frame_of_token)
        return x + self.ffn(h) * mod[:, frame_of_token, 5]


STREAM_LINEARS = (
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.o",
    "ffn.0",
    "ffn.2",
)
"""The block linears a stream adapter changes: every one a chunk's tokens pass through. The text path's
cross_attn.k/v stay the base model's, so one prompt's cross-attention K/V serve every chunk."""


class LowRankDelta(nn.Module):
    """A weight delta up @ down of rank r: down [r, in], up [out, r] (keys `down`, `up`)."""

    def __init__(self, rank: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.empty(out_features, rank))
        if not self.down.is_meta:  # as Linear: a shape-only model draws nothing
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """down ~ N(0, 1/in), up = 0: the delta starts at zero (the base model's output)."""
        with torch.no_grad():
            self.down.normal_().div_(self.down.shape[1] ** 0.5)
            self.up.zero_()

    def delta(self) -> torch.Tensor:
        """[out, in] float32."""
        return self.up.float() @ self.down.float()


class StreamAdapter(nn.ModuleList):
    """Per block, a LowRankDelta per STREAM_LINEARS linear (keys `stream_adapter.{layer}.{linear with
    '_' for '.'}.down`, e.g. `stream_adapter.0.self_attn_q.up`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        shapes = {
            "self_attn.q": (cfg.dim, cfg.dim), "self_attn.k": (cfg.dim, cfg.dim),
            "self_attn.v": (cfg.dim, cfg.dim), "self_attn.o": (cfg.dim, cfg.dim),
            "cross_attn.q": (cfg.dim, cfg.dim), "cross_attn.o": (cfg.dim, cfg.dim),
            "ffn.0": (cfg.dim, cfg.ffn_dim), "ffn.2": (cfg.ffn_dim, cfg.dim),
        }  # fmt: skip
        super().__init__(
            nn.ModuleDict(
                {
                    name.replace(".", "_"): LowRankDelta(cfg.stream_rank, *shapes[name])
                    for name in STREAM_LINEARS
                }
            )
            for _ in range(cfg.num_layers)
        )

    def deltas(self, layer: int) -> dict[str, LowRankDelta]:
        """{STREAM_LINEARS name: its delta} of one block."""
        return {name: self[layer][name.replace(".", "_")] for name in STREAM_LINEARS}


class Head(nn.Module):
    """Modulated output head: LayerNorm, per-frame shift/scale from the time embedding, Linear."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = Linear(cfg.dim, cfg.patch_out)
        self.modulation = modulation(2, cfg.dim)

    def forward(self, x: torch.Tensor, e_tok: torch.Tensor) -> torch.Tensor:
        """x: [B, L, C]; e_tok: [B, L, C] time embedding per token -> [B, L, patch_out]."""
        mod = self.modulation.unsqueeze(1) + e_tok.unsqueeze(2)  # [B, L, 2, C]
        return self.head(layer_norm(x, self.eps) * (1 + mod[:, :, 1]) + mod[:, :, 0])


class PatchEmbedding(nn.Conv3d):
    """Wan's patch embedding (a strided Conv3d, keys `weight`, `bias`); with cfg.pos_grid also a learned
    absolute position embedding `pos` [rows * cols, dim] added to every frame's tokens (not in Wan)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.in_dim, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos_grid = cfg.pos_grid
        self.pos = nn.Parameter(torch.zeros(math.prod(cfg.pos_grid), cfg.dim)) if cfg.pos_grid else None

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # as Linear: a shape-only model draws nothing
            super().reset_parameters()

    def add_position(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """tokens [B, F*rows*cols, dim] in (f, row, col) order, plus the position embedding if any."""
        if self.pos is None:
            return tokens
        if (rows, cols) != tuple(self.pos_grid):
            from ropesp.errors import ConfigError

            ph, pw = self.kernel_size[1:]
            raise ConfigError(
                f"this model has a position embedding for a {self.pos_grid[0] * ph} x {self.pos_grid[1] * pw} "
                f"latent grid; --latent-height/--latent-width {rows * ph} x {cols * pw} do not match"
            )
        b, n, c = tokens.shape
        return (tokens.view(b, n // (rows * cols), rows * cols, c) + self.pos.to(tokens.dtype)).view(b, n, c)


class CausalWanDiT(nn.Module):
    """Causal Wan2.1 DiT. Latents [B, F, C, H, W] in, flow (velocity) [B, F, C, H, W] out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg)
        self.text_embedding = nn.Sequential(
            Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(
            Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), Linear(cfg.dim, cfg.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.stream_adapter = StreamAdapter(cfg) if cfg.stream_rank else None
        self.stream_blocks: nn.ModuleList | None = None
        """The blocks with the stream adapter merged in (merge_stream_adapter), for chunks from
        cfg.stream_from_frame on; None until merged, or without an adapter."""

    # --- the stream adapter ------------------------------------------------------------------
    def uses_stream_blocks(self, start_frame: int) -> bool:
        """Whether a chunk whose first latent frame is start_frame runs with the stream blocks."""
        return self.stream_blocks is not None and start_frame >= self.cfg.stream_from_frame

    def merge_stream_adapter(self) -> None:
        """Build `stream_blocks` once the weights are loaded (before any FP8 quantization or compile):
        blocks whose STREAM_LINEARS weights are W + up @ down (summed in fp32, rounded once to W's dtype)
        and whose every other parameter IS the base block's (shared, no copy). They are a submodule
        (moved, quantized and listed with the model) but not part of the state dict, which keeps the
        adapter's factors: a checkpoint stays base weights + rank-r deltas. No-op without an adapter."""
        if self.stream_adapter is None or self.stream_blocks is not None:
            return
        blocks = nn.ModuleList()
        for layer, base in enumerate(self.blocks):
            with torch.device("meta"):
                block = Block(self.cfg)
            deltas = self.stream_adapter.deltas(layer)
            for name, param in base.named_parameters():
                module_name, _, leaf = name.rpartition(".")
                if leaf == "weight" and module_name in deltas:
                    merged = (param.float() + deltas[module_name].delta()).to(param.dtype)
                    param = nn.Parameter(merged.detach(), requires_grad=False)
                block.get_submodule(module_name).register_parameter(leaf, param)
            blocks.append(block.train(base.training))
        self.stream_blocks = blocks
        self.register_state_dict_post_hook(_drop_stream_blocks)

    # --- embeddings -------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, F, C, H, W] latents -> [B, F*rows*cols, dim] tokens in (f, row, col) order.

        The strided Conv3d as the one GEMM it is (kernel = stride): the same sums, through cuBLAS,
        where the convolution would be the run's only cuDNN convolution (its first call costs a fresh
        process ~0.1 s on an H200 before the first chunk; bench/RESULTS.md)."""
        conv = self.patch_embedding
        b, f, c, h, w = x.shape
        pt, ph, pw = conv.kernel_size
        frames, rows, cols = f // pt, h // ph, w // pw
        x = x[:, : frames * pt, :, : rows * ph, : cols * pw].to(conv.weight.dtype)  # as the strided conv
        patches = x.reshape(b, frames, pt, c, rows, ph, cols, pw).permute(0, 1, 4, 6, 3, 2, 5, 7)
        # [B, F', r, c, C, pt, ph, pw]: the weight's [dim, C, pt, ph, pw] order
        tokens = F.linear(patches.reshape(b, frames * rows * cols, -1), conv.weight.flatten(1), conv.bias)
        return conv.add_position(tokens, rows, cols)  # [B, L, dim]

    def embed_time(self, t_sinusoid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t_sinusoid: [B, F, freq_dim] (float64 ok) -> e [B, F, C], e0 [B, F, 6, C] in model dtype."""
        dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(t_sinusoid.to(dtype))  # [B, F, C]
        e0 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))  # [B, F, 6, C]
        return e, e0

    def embed_text(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """prompt_embeds: [B, Lt <= text_len, text_dim] -> [B, text_len, dim] (zero-padded first)."""
        b, lt, _ = prompt_embeds.shape
        pad = prompt_embeds.new_zeros(b, self.cfg.text_len - lt, prompt_embeds.shape[-1])
        ctx = torch.cat([prompt_embeds, pad], dim=1).to(self.text_embedding[0].weight.dtype)
        return self.text_embedding(ctx)

    def cross_kv(self, prompt_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention K/V of every layer for one prompt: [B, text_len, H, D] each."""
        ctx = self.embed_text(prompt_embeds)
        return [blk.cross_attn.cross_kv(ctx) for blk in self.blocks]

    def unpatchify(self, out: torch.Tensor, frames: int, rows: int, cols: int) -> torch.Tensor:
        """out: [B, L, patch_out] -> [B, F, C_out, H, W]."""
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        b = out.shape[0]
        u = out.view(b, frames, rows, cols, pt, ph, pw, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)  # [B, C, F, pt, rows, ph, cols, pw]
        u = u.reshape(b, c, frames * pt, rows * ph, cols * pw)
        return u.transpose(1, 2)  # [B, F, C, H, W]

    # --- one chunk ------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t_sinusoid: torch.Tensor,
        cross_kv: list[tuple[torch.Tensor, torch.Tensor]],
        runner: ChunkRunner,
        stream: bool = False,
    ) -> torch.Tensor:
        """One forward of a chunk.

        x: [B, F, C, H, W] latents of the chunk; t_sinusoid: [B, F, freq_dim] float64
        (`timestep_sinusoid` of each frame's timestep); cross_kv: from `cross_kv`;
        runner: execution mode (cache, SP); stream: run the stream blocks (`uses_stream_blocks` of the
        chunk's first frame). Returns the flow prediction [B, F, C_out, H, W] fp32.
        """
        _, frames, _, height, width = x.shape
        rows, cols = height // self.cfg.patch_size[1], width // self.cfg.patch_size[2]
        tokens = runner.shard(self.patchify(x))  # [B, L_local, C]
        frame_of_token = self.frame_index(runner.first_token, tokens.shape[1], frames, rows * cols, x.device)
        e, e0 = self.embed_time(t_sinusoid)
        for i, block in enumerate(self.stream_blocks if stream else self.blocks):
            q, k, v = block.pre_attention(tokens, e0, frame_of_token, runner.rope)
            o = runner.attention(i, q, k, v)
            tokens = block.post_attention(tokens, o, e0, frame_of_token, *cross_kv[i])
        out = self.head(tokens, e[:, frame_of_token])  # [B, L_local, patch_out]
        out = runner.gather(out)  # [B, L, patch_out]
        return self.unpatchify(out.float(), frames, rows, cols)

    @staticmethod
    def frame_index(first_token: int, length: int, frames: int, frame_tokens: int, device) -> torch.Tensor:
        """Frame of each of this rank's tokens [L_local] int64; SP padding maps to the last frame."""
        g = torch.arange(first_token, first_token + length, device=device)
        return torch.clamp(g // frame_tokens, max=frames - 1)


def _drop_stream_blocks(module: CausalWanDiT, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: the merged stream blocks are derived from blocks + stream_adapter."""
    for key in [k for k in state_dict if k.startswith(prefix + "stream_blocks.")]:
        del state_dict[key]


RANDOM_WEIGHTS_SEED = 0
"""The seed of every preset's random weights (no checkpoint): `ropesp build` and the runtime draw the same."""


def random_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, seed: int = RANDOM_WEIGHTS_SEED
) -> CausalWanDiT:
    """The preset's seeded random-weight model, eval mode, on device in dtype: the one recipe that
    `ropesp build` (whose engines store these weights) and the eager/compile runtime both use, so engines
    built from a preset hold exactly the run's parameters. Allocated in the run's dtype where it lives
    (no full-size fp32 copy); each tensor is drawn in fp32 on the device and rounded once on copy."""
    with torch.device("meta"):
        model = CausalWanDiT(cfg).to(dtype=dtype)
    model.to_empty(device=device)
    init_weights(model, seed)
    model.merge_stream_adapter()
    return model.eval().requires_grad_(False)


def init_weights(model: CausalWanDiT, seed: int) -> None:
    """Seeded random weights with Wan-like scales (for the embedded default and benchmarks).

    Numbers are drawn on the parameters' device (fast for full-size models on a GPU); a given seed
    gives the same weights for every rank of one device type.
    """
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=g, device=device)

    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                p.copy_(1.0 + 0.1 * randn(p.shape))
            elif name.endswith("bias"):
                p.copy_(0.02 * randn(p.shape))
            elif name.endswith("modulation"):
                p.copy_(randn(p.shape) / math.sqrt(p.shape[-1]))
            else:
                fan_in = math.prod(p.shape[1:]) if p.dim() > 1 else p.shape[0]
                p.copy_(randn(p.shape) / math.sqrt(fan_in))
