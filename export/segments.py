"""How the DiT is cut for export: four traced segments per rank, weights as graph inputs.

    embed  latents [B, F, C_in, H, W], t_sinusoid [B, F, freq_dim]
                -> tokens [B, L, C], e [B, F, C], e0 [B, F, 6, C]              (all tokens; every rank)
    pre    x [B, L_local, C], e0, start_frame int32 [1], frame_of_token int64 [L_local], one block's weights
                -> q, k, v [B, L_local, H, D]       norm + modulation, q/k/v, q/k RMSNorm, RopeSP node
    post   x, o [B, L_local, H, D], e0, cross_k, cross_v [B, text_len, H, D], frame_of_token, block weights
                -> x_out [B, L_local, C]            o-proj + gated residual, cross-attention, FFN
    head   x [B, L_local, C], e [B, F, C], frame_of_token, head weights -> out [B, L_local, patch_out]

Between them the runtime runs what needs a communicator or the cache (runtime/engine.py): the token
shard after `embed`, per layer the all-to-all into head-sharded q/k/v, the cache write and attention over
the window, the all-to-all back (SPState's runner, shared with the eager path), and after `head` the
all-gather and unpatchify. Why this cut:
- No engine needs NCCL or cache bindings: collectives stay on the runtime's stream (and inside its CUDA
  graphs), the persistent KV cache stays one runtime-owned buffer written in place, and the same engines
  serve pure Ulysses and the hybrid ring layout.
- Weights are inputs, so ONE pre and ONE post graph per rank serve every layer (the block math is
  traced once): artifacts hold no weights, builds are fast, and one weights.safetensors serves all ranks.
- Shapes are static per chunk length. The only per-rank statics are the RopeSP attributes (grid,
  first_token), so only `pre` differs between ranks: `embed`, `post` and `head` are one graph for every
  rank (P + 3 compiled graphs instead of 3P + 1). The frame of each local token (for the per-frame
  modulation) is static per rank too, but it is an input (`frame_of_token`, a runtime constant) rather
  than a baked-in index for exactly that reason. start_frame is a graph input, so one engine set serves
  every chunk of every stream.
The math stays in ropesp.model: each segment calls a CausalWanDiT / Block / Head method through
`torch.func.functional_call`, binding the weight inputs to the template module's parameter names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ropesp.config import ModelConfig, VideoGeometry
from ropesp.manifest import SegmentSpec, TensorSpec
from ropesp.model.rope import RopeGrid
from ropesp.model.wan import Block, CausalWanDiT, Head
from ropesp.parallel import TokenShard
from ropesp.plugins.rope_sp import rope_for_rank

SEGMENTS = ("embed", "pre", "post", "head")
EMBED_WEIGHTS = ("patch_embedding.", "time_embedding.", "time_projection.")
PRE_WEIGHTS = (
    "modulation",
    "self_attn.q.",
    "self_attn.k.",
    "self_attn.v.",
    "self_attn.norm_q.",
    "self_attn.norm_k.",
)
POST_WEIGHTS = (
    "modulation",
    "self_attn.o.",
    "norm3.",
    "cross_attn.q.",
    "cross_attn.norm_q.",
    "cross_attn.o.",
    "ffn.",
)
"""cross_attn.k/v/norm_k are used once per prompt by the runtime's text path (CausalWanDiT.cross_kv)."""
DTYPE_NAMES = {
    torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
    torch.int32: "int32", torch.int64: "int64",
}  # fmt: skip


class _Method(nn.Module):
    """Calls fn(template, *args): the module whose parameters functional_call rebinds."""

    def __init__(self, template: nn.Module, fn: Callable) -> None:
        super().__init__()
        self.template = template
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.template, *args)


class Segment(nn.Module):
    """forward(*activations, *weights): a model method with its weights taken as inputs.

    The template module is held outside the nn.Module tree, so its own tensors never become graph
    constants: the graph's inputs are the activations, then the weights.
    """

    def __init__(
        self, template: nn.Module, fn: Callable, weight_names: Sequence[str], num_activations: int
    ) -> None:
        super().__init__()
        object.__setattr__(self, "method", _Method(template, fn))  # deliberately not a submodule
        self.weight_names = list(weight_names)
        self.num_activations = num_activations

    def forward(self, *inputs: torch.Tensor):
        acts, weights = inputs[: self.num_activations], inputs[self.num_activations :]
        params = {f"template.{n}": w for n, w in zip(self.weight_names, weights, strict=True)}
        return functional_call(self.method, params, acts)


# --- the segment bodies: model methods only ---------------------------------------------------
def _embed(model: CausalWanDiT, latents, t_sinusoid):
    return (model.patchify(latents), *model.embed_time(t_sinusoid))  # tokens, e, e0


def _pre(block: Block, x, e0, start_frame, frame_of_token, *, grid: RopeGrid):
    rope = rope_for_rank(grid, start_frame, op=True)
    return block.pre_attention(x, e0, frame_of_token, rope)  # q, k, v


def _post(block: Block, x, o, e0, cross_k, cross_v, frame_of_token):
    return block.post_attention(x, o, e0, frame_of_token, cross_k, cross_v)


def _head(head: Head, x, e, frame_of_token):
    return head(x, e[:, frame_of_token])


def weight_names(module: nn.Module, prefixes: tuple[str, ...] | None) -> list[str]:
    """Parameter names of module used by a segment (prefixes None: all of them)."""
    return [n for n, _ in module.named_parameters() if prefixes is None or n.startswith(prefixes)]


@dataclass
class TracedSegment:
    """A segment ready to export: the module, example inputs (weights are the real ones) and its spec."""

    module: Segment
    example: tuple[torch.Tensor, ...]
    spec: SegmentSpec
    static_key: tuple
    """Equal keys (across ranks) mean identical graphs: build once, copy the file."""


def _spec(name, dtype, shape, kind="activation") -> TensorSpec:
    return TensorSpec(name, DTYPE_NAMES[dtype], [int(s) for s in shape], kind)


def make_segments(
    model: CausalWanDiT,
    geometry: VideoGeometry,
    frames: int,
    shard: TokenShard,
    stem_suffix: str = "",
    batch: int = 1,
) -> list[TracedSegment]:
    """The four segments of one rank at one chunk length, on the model's device and dtype."""
    cfg: ModelConfig = model.cfg
    dtype = model.patch_embedding.weight.dtype
    device = model.patch_embedding.weight.device
    b, f, c, rows, cols = batch, frames, cfg.dim, geometry.rows, geometry.cols
    h, d, n = cfg.num_heads, cfg.head_dim, shard.length
    g = torch.Generator(device="cpu").manual_seed(0)

    def act(name, shape, dt=dtype):
        return _spec(name, dt, shape), torch.randn(shape, generator=g).to(device=device, dtype=dt)

    sf_spec = _spec("start_frame", torch.int32, [1])
    sf = torch.zeros(1, dtype=torch.int32, device=device)
    fot_index = CausalWanDiT.frame_index(shard.first, n, f, geometry.frame_tokens, device)  # [L_local] int64
    fot = (_spec("frame_of_token", torch.int64, [n]), fot_index)
    block = model.blocks[0]
    embed_acts = [act("latents", (b, f, cfg.in_dim, geometry.latent_height, geometry.latent_width)),
                  act("t_sinusoid", (b, f, cfg.freq_dim))]  # fmt: skip
    x, e0, e = act("x", (b, n, c)), act("e0", (b, f, 6, c)), act("e", (b, f, c))
    post_acts = [x, act("o", (b, n, h, d)), e0, act("cross_k", (b, cfg.text_len, h, d)),
                 act("cross_v", (b, cfg.text_len, h, d)), fot]  # fmt: skip
    table = [
        # name, template, fn, weight prefixes, scope, activations, outputs, differs between ranks
        ("embed", model, _embed, EMBED_WEIGHTS, "", embed_acts,
         [("tokens", (b, f * rows * cols, c)), ("e", (b, f, c)), ("e0", (b, f, 6, c))], False),
        ("pre", block, functools.partial(_pre, grid=RopeGrid(f, rows, cols, shard.first, cfg.rope_theta)),
         PRE_WEIGHTS, "blocks.{layer}.", [x, e0, (sf_spec, sf), fot],
         [("q", (b, n, h, d)), ("k", (b, n, h, d)), ("v", (b, n, h, d))], True),
        ("post", block, _post, POST_WEIGHTS, "blocks.{layer}.", post_acts, [("x_out", (b, n, c))], False),
        ("head", model.head, _head, None, "head.", [x, e, fot], [("out", (b, n, cfg.patch_out))], False),
    ]  # fmt: skip
    out = []
    for name, template, fn, prefixes, scope, acts, outputs, per_rank in table:
        names = weight_names(template, prefixes)
        params = dict(template.named_parameters())
        weights = [params[k].detach() for k in names]
        module = Segment(template, fn, names, len(acts))
        spec = SegmentSpec(
            name=name,
            frames=f,
            stem=name + stem_suffix,
            inputs=[s for s, _ in acts]
            + [_spec(k, w.dtype, w.shape, "weight") for k, w in zip(names, weights)],
            outputs=[_spec(o, dtype, shape) for o, shape in outputs],
            weight_scope=scope,
        )
        key = (name, f, shard.length, shard.first if per_rank else None)
        out.append(TracedSegment(module.eval(), (*[t for _, t in acts], *weights), spec, key))
    return out
