"""The stream adapter in its training form: per-token gated low-rank deltas on the frozen base model.

At inference a chunk runs either the base blocks or the stream blocks (ropesp.model.wan: the adapter's
deltas merged into the weights), chosen by the chunk's first stream frame. A training sample holds chunks
on both sides of `stream_from_frame` (the sink, a run from the stream's start), so here each adapted
linear computes base(x) + gate * (x @ down^T) @ up^T with a gate of 1 on the tokens of chunks at or past
that frame and 0 elsewhere: the same function per token, with gradients reaching only down and up.

    gates = StreamGates.install(model)     # wraps model.blocks' STREAM_LINEARS
    gates.set(on)                          # on: [B, L] bool, the tokens the next forward adapts
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ropesp.model.wan import CausalWanDiT, Linear, LowRankDelta


class GatedLinear(Linear):
    """A base Linear (its own frozen weight and bias, shared) plus a gated LowRankDelta."""

    def __init__(self, base: Linear, delta: LowRankDelta) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        object.__setattr__(self, "delta", delta)  # the model's stream_adapter holds it (one state dict key)
        self.gate: torch.Tensor | None = None
        """[B, L, 1] in the activations' dtype, or None: the base Linear alone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, in] -> [B, L, out]."""
        y = F.linear(x, self.weight, self.bias)
        if self.gate is None:
            return y
        d = self.delta
        return y + self.gate.to(y.dtype) * F.linear(F.linear(x, d.down.to(x.dtype)), d.up.to(x.dtype))


class StreamGates:
    """The GatedLinears of one model and the gate they share."""

    def __init__(self, model: CausalWanDiT, linears: list[GatedLinear]) -> None:
        self.model, self.linears = model, linears

    @classmethod
    def install(cls, model: CausalWanDiT) -> StreamGates:
        """Wrap every STREAM_LINEARS linear of model.blocks in a GatedLinear over the model's stream
        adapter (the model must have one: cfg.stream_rank > 0)."""
        if model.stream_adapter is None:
            raise ValueError("the model has no stream adapter (stream_rank 0)")
        linears = []
        for layer, block in enumerate(model.blocks):
            for name, delta in model.stream_adapter.deltas(layer).items():
                parent_name, _, leaf = name.rpartition(".")
                parent = block.get_submodule(parent_name)
                gated = GatedLinear(getattr(parent, leaf), delta)
                parent._modules[leaf] = gated
                linears.append(gated)
        return cls(model, linears)

    def set(self, on: torch.Tensor | None) -> None:
        """on: [B, L] bool, the tokens of the next forward that take the adapter (None: none do)."""
        gate = None if on is None else on[..., None].float()
        for linear in self.linears:
            linear.gate = gate

    def on_tokens(self, slot_chunks: torch.Tensor, chunk: int, slot_tokens: int) -> torch.Tensor:
        """[B, slots] stream chunk of every slot -> [B, slots * slot_tokens] bool: the tokens of the
        slots whose first frame is at or past the model's stream_from_frame."""
        on = slot_chunks * chunk >= self.model.cfg.stream_from_frame  # [B, slots]
        return on.repeat_interleave(slot_tokens, dim=1)
