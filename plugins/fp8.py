"""FP8 (e4m3) GEMMs for the transformer blocks through torchao's float8 inference API.

    apply_fp8(model, precision="fp8") -> names of the Linear layers whose weights became float8

Applied once to a plain CausalWanDiT at load (the model knows nothing of precision): every Linear of
the blocks (self-attention q/k/v/o, cross-attention q/k/v/o, FFN up/down) gets e4m3 weights with one
scale per output channel, quantized here once; its input is quantized per row (token) at run time, and
the GEMM is `torch._scaled_mm` (rowwise scales, bf16 output). Under the compile backend the activation
quantization (row amax, scale, cast) is traced into the same Inductor regions as the LayerNorm and
modulation that produce the input, so it costs no extra pass over memory; the FFN's down projection
takes its input from one kernel that applies the GELU and quantizes (plugins/fp8_ffn.py).
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

MIN_CAPABILITY = (8, 9)
"""First NVIDIA architecture with e4m3 tensor-core GEMMs (Ada); Hopper is (9, 0)."""
FP8_LINEARS = {
    "fp8": re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])"),
    "fp8-ffn": re.compile(r"blocks\.\d+\.ffn\.[02]"),
}
"""Per FP8 precision, the fully qualified names of the block Linears that run in FP8 (Wan checkpoint
keys, model/wan.py). fp8-ffn leaves the attention projections in bf16 (alone, Wan-1.3B's 1536 x 1536
FP8 GEMMs with the activation's quantization ran 0.83x bf16 on an H200, 2026-12-01), but end to end it
ran 1.02x bf16 compile against fp8's 1.05x, with a smaller error (final latents' rel L2 vs bf16 0.028
against 0.044; bench/RESULTS.md twelfth session)."""
PRECISIONS = ("bf16", *FP8_LINEARS)


def is_fp8_linear(module: nn.Module, fqn: str, precision: str = "fp8") -> bool:
    """The quantize-at-load selection of `precision`: True for the block Linears it runs in FP8."""
    return isinstance(module, nn.Linear) and FP8_LINEARS[precision].fullmatch(fqn) is not None


def fp8_linear_names(model: nn.Module, precision: str = "fp8") -> list[str]:
    """Names of the modules apply_fp8 quantizes for precision, in model order."""
    return [name for name, m in model.named_modules() if is_fp8_linear(m, name, precision)]


def gpu_capability_reason(device: torch.device | str, need: tuple[int, int], what: str) -> str | None:
    """Why device is not a CUDA GPU of compute capability >= need (None when it is); `what` names the
    hardware that needs it in the message (e.g. "FP8 tensor cores need")."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"it needs a CUDA GPU of compute capability >= {need[0]}.{need[1]}, and the device is {device.type}"
    if not torch.cuda.is_available():
        return f"it needs a CUDA GPU of compute capability >= {need[0]}.{need[1]}, and this torch sees none"
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {cap[0]}.{cap[1]}; {what} >= {need[0]}.{need[1]}"
    return None


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

    config: a torchao quantization config (default `default_config()`, which needs a GPU of compute
    capability >= 8.9: call `check_fp8` first for a clear message). The model must already be on its
    device and in its dtype."""
    from torchao.quantization import quantize_

    from ropesp.model.wan import FeedForward
    from ropesp.plugins.fp8_ffn import FP8FeedForward

    names = fp8_linear_names(model, precision)
    quantize_(
        model,
        config if config is not None else default_config(),
        filter_fn=lambda m, fqn: is_fp8_linear(m, fqn, precision),
    )
    for name, module in model.named_modules():
        if isinstance(module, FeedForward) and f"{name}.2" in names:
            # _scaled_mm has no GELU epilogue: one kernel applies GELU and quantizes the down
            # projection's input instead (plugins/fp8_ffn.py)
            FP8FeedForward.from_quantized(module)
    return names
