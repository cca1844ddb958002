"""FP8 (e4m3) GEMMs for the transformer blocks through torchao's float8 inference API.

    apply_fp8(model, precision="fp8") -> names of the Linear layers whose weights became float8

Applied once to a plain CausalWanDiT at load (the model knows nothing of precision): every Linear of
the blocks (self-attention q/k/v/o, cross-attention q/k/v/o, FFN up/down) gets e4m3 weights with one
scale per output channel, quantized here once; its input is quantized per row (token) at run time, and
the GEMM is `torch._scaled_mm` (rowwise scales, bf16 output). The activation's quantization is one
Triton kernel fused with what produces it: the modulated LayerNorms (norm1 before q/k/v, norm2 before
the FFN), the affine norm3 before the cross-attention's q, the FFN's GELU; the attention outputs are
quantized by a kernel of their own (plugins/e4m3_rows.py, plugins/fp8_layers.py).
What stays in the model's dtype: the patch, text and time embeddings, the norms, the modulation
parameters, the head and the KV cache (the first and last layers are the most sensitive, and their
FLOPs are negligible; `--attention fp8` keeps the cache in e4m3 instead, plugins/e4m3_cache.py).

Needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper, Blackwell) and torchao
(`pip install -e ".[fp8]"`); `check_fp8` says which is missing.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ropesp.errors import BackendUnavailableError, ConfigError
from ropesp.plugins.e4m3 import gpu_capability_reason
from ropesp.settings import PRECISIONS

MIN_CAPABILITY = (8, 9)
"""First NVIDIA architecture with e4m3 tensor-core GEMMs (Ada); Hopper is (9, 0)."""
FP8_LINEARS = {
    "fp8": re.compile(r"(stream_)?blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])"),
    "fp8-ffn": re.compile(r"(stream_)?blocks\.\d+\.ffn\.[02]"),
}
"""Per FP8 precision, the fully qualified names of the block Linears that run in FP8 (Wan checkpoint
keys, model/wan.py; and of the stream adapter's merged blocks). fp8-ffn leaves the attention projections in bf16 (alone, Wan-1.3B's 1536 x 1536
FP8 GEMMs with the activation's quantization ran 0.83x bf16 on an H200, 2026-12-01), but end to end it
ran 1.02x bf16 compile against fp8's 1.05x, with a smaller error (final latents' rel L2 vs bf16 0.028
against 0.044; bench/RESULTS.md twelfth session)."""
assert PRECISIONS == ("bf16", *FP8_LINEARS), "settings.PRECISIONS names every FP8_LINEARS selection"


def is_fp8_linear(module: nn.Module, fqn: str, precision: str = "fp8") -> bool:
    """The quantize-at-load selection of `precision`: True for the block Linears it runs in FP8."""
    return isinstance(module, nn.Linear) and FP8_LINEARS[precision].fullmatch(fqn) is not None


def fp8_linear_names(model: nn.Module, precision: str = "fp8") -> list[str]:
    """Names of the modules apply_fp8 quantizes for precision, in model order."""
    return [name for name, m in model.named_modules() if is_fp8_linear(m, name, precision)]


def stream_linears(model: nn.Module, names: list[str]) -> dict[str, tuple[str, nn.Module | None]]:
    """{stream block Linear among names: (the base block Linear's name, the stream adapter's LowRankDelta
    of it, or None where the adapter leaves it alone)} of a model with merged stream blocks
    (CausalWanDiT.merge_stream_adapter); empty without. Under FP8 these are not quantized again: each
    is its base block's E4M3Linear (the same module), or shares its e4m3 weight and adds the delta
    (fp8_layers.E4M3AdaptedLinear)."""
    adapter = getattr(model, "stream_adapter", None)
    if getattr(model, "stream_blocks", None) is None or adapter is None:
        return {}
    out = {}
    for fqn in names:
        if fqn.startswith("stream_blocks."):
            layer, linear = fqn.removeprefix("stream_blocks.").split(".", 1)
            out[fqn] = (f"blocks.{layer}.{linear}", adapter.deltas(int(layer)).get(linear))
    return out


def fp8_unsupported_reason(device: torch.device | str) -> str | None:
    """Why FP8 GEMMs cannot run on device (None when they can): no CUDA, too old a GPU, or no torchao."""
    reason = gpu_capability_reason(device, MIN_CAPABILITY, "FP8 tensor cores (Ada, Hopper or newer) need")
    if reason is not None:
        return reason
    try:
        import torchao  # noqa: F401
    except ImportError:
        return 'it needs torchao: pip install -e ".[fp8]" (or pip install torchao)'
    return None


def check_fp8(device: torch.device | str, flag: str = "--precision fp8") -> None:
    """Raise ConfigError (hardware) or BackendUnavailableError (library) naming `flag` where FP8 GEMMs
    cannot run on device."""
    reason = fp8_unsupported_reason(device)
    if reason is None:
        return
    error = BackendUnavailableError if "torchao" in reason else ConfigError
    raise error(f"{flag}: {reason}")


def default_config():
    """torchao's float8 inference config: dynamic per-row activation scales, per-channel weights."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    # set_inductor_config=False: torchao would switch on Inductor's coordinate-descent tuning for the whole
    # process, which benchmarks every generated kernel while compiling (minutes for the Wan regions) and
    # changes the bf16 configurations compiled after it in the same process
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)


def apply_fp8(model: nn.Module, config=None, precision: str = "fp8") -> list[str]:
    """Quantize the block Linears of model that precision selects (FP8_LINEARS) in place, weights
    once, here; returns their names.

    torchao quantizes the weights (config: a torchao float8 config with one scale per output channel,
    default `default_config()`, which needs a GPU of compute capability >= 8.9: call `check_fp8` first
    for a clear message); each selected Linear then becomes an E4M3Linear on those e4m3 weights, each
    FFN an FP8FeedForward, and each norm whose every reader is an E4M3Linear quantizes its output
    itself (plugins/fp8_layers.py). The stream blocks' Linears (stream_linears) are not quantized
    again: each is its base block's, or shares its e4m3 weight and adds the adapter's delta. The model
    must already be on its device and in its dtype."""
    from torchao.quantization import quantize_

    from ropesp.model.wan import Block, LayerNorm
    from ropesp.plugins import fp8_layers as layers

    names = fp8_linear_names(model, precision)
    shared = stream_linears(model, names)
    quantize_(
        model,
        config if config is not None else default_config(),
        filter_fn=lambda m, fqn: is_fp8_linear(m, fqn, precision) and fqn not in shared,
    )
    selected = set(names)

    def e4m3(fqn: str, linear: nn.Module) -> layers.E4M3Linear:
        if fqn not in shared:
            return layers.E4M3Linear.from_quantized(linear)
        base_name, delta = shared[fqn]
        base = model.get_submodule(base_name)  # converted already: the base blocks come first below
        return base if delta is None else layers.E4M3AdaptedLinear.of(base, delta)

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]
    for name, block in sorted(blocks, key=lambda item: item[0].startswith("stream_blocks.")):
        for attn_name in ("self_attn", "cross_attn"):
            attn = getattr(block, attn_name)
            for proj in "qkvo":
                if (fqn := f"{name}.{attn_name}.{proj}") in selected:
                    setattr(attn, proj, e4m3(fqn, getattr(attn, proj)))
        if {f"{name}.ffn.0", f"{name}.ffn.2"} <= selected:
            for i in (0, 2):
                block.ffn[i] = e4m3(f"{name}.ffn.{i}", block.ffn[i])
            layers.FP8FeedForward.from_quantized(block.ffn)
            layers.swap_class(block.norm2, layers.E4M3ModulatedLayerNorm)
        if {f"{name}.self_attn.{p}" for p in "qkv"} <= selected:
            layers.swap_class(block.norm1, layers.E4M3ModulatedLayerNorm)
        if (
            f"{name}.cross_attn.q" in selected
            and type(block.norm3) is LayerNorm
            and block.norm3.weight is not None
        ):
            layers.swap_class(block.norm3, layers.E4M3LayerNorm)
    return names
