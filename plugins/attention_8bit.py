"""8-bit self-attention over the KV cache, from maintained kernel libraries.

    select_attention(mode) -> attend(q, k, v): q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] bf16
    kv_cache_class(mode) -> the KVCache class whose windows attend takes (bf16; E4M3 for fp8)

Modes (`--attention`):
  sdpa  torch SDPA in the cache's dtype (cuDNN first on CUDA, runtime/executor.py): the default and
        the reference
  fa3   FlashAttention-3's bf16 forward (package `fa3-fwd`, Hopper): measured 1.19-1.21x cuDNN at these
        shapes with cuDNN's error against fp32 (bench/2026-12-01-fp8)
  fp8   FlashAttention-3's e4m3 forward (package `fa3-fwd`, Hopper) over an e4m3 KV cache
        (plugins/e4m3_cache.py: keys and values quantized once, when written, under one scale per
        stream, layer and head; keys less the stream's offset); q is quantized per call, one scale
        per (batch, head) from its amax; the output is bf16
  int8  SageAttention (package `sageattention`, Triton): INT8 q.k^T with per-block scales and a
        smoothed k, fp16 P.v; it quantizes its bf16 inputs itself
The fp8 mode's cache is e4m3 because FA3's e4m3 kernel alone runs 1.45-1.56x cuDNN on an H200 while
quantizing a bf16 window per call cost 0.18-0.79 ms, more than the kernel saved (bench/2026-12-01-fp8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ropesp.errors import BackendUnavailableError, ConfigError
from ropesp.plugins.e4m3 import E4M3, compiled, gpu_capability_reason, quantize_per_head, rotated
from ropesp.settings import ATTENTION_MODES

_PACKAGES = {
    "fa3": ("fa3_fwd_interface", "fa3-fwd"),
    "fp8": ("fa3_fwd_interface", "fa3-fwd"),
    "int8": ("sageattention", "sageattention"),
}
_MIN_CAPABILITY = {"fa3": (9, 0), "fp8": (9, 0), "int8": (8, 0)}
"""fa3-fwd ships sm_90 kernels only; SageAttention's Triton kernels run on Ampere and newer."""
_HEAD_DIMS = {"int8": (64, 96, 128)}
"""Head dims a kernel takes, where it does not take every one (SageAttention 1.0.6 asserts these)."""


KEYS_PER_SPLIT: int | None = 4680
"""Keys one FlashAttention-3 program accumulates P.v over before its split-KV path merges the pieces in
fp32 (None: the whole window in one piece). 4680 (a 480p chunk's tokens): the latents' per-chunk rel L2
from bf16 stays 0.046-0.058 over 21 latent frames at 480p and 0.043-0.056 at 720p (one piece: 0.046 ->
0.181 and 0.072 -> 0.283), at 0.968x the FPS of one piece (H100, compile, 57.0 vs 58.9 FPS), and the demo
model keeps its score (0.896; bench/RESULTS.md).

FA3's e4m3 P.v runs on the tensor cores' FP8 MMA, whose accumulator keeps fewer bits than fp32
(~13 mantissa bits, SageAttention2's measurement): a value offset shared by every key makes the
accumulator grow with the window and its truncations with it. Measured on an H100 (2026-12-06,
scripts/fp8_attention_accuracy.py: Lq 4680, 12 x 128, values offset by one standard deviation; rel L2
against exact attention over the same e4m3 inputs): 0.071 / 0.138 / 0.238 / 0.340 at 4680 / 9360 /
18720 / 32760 keys. Pieces of 4680 keys hold it at 0.071; taking the values' offset out
(E4M3KVCache.smooth_values) brings it to 0.0017-0.0018 at every length (bf16 SDPA: 0.0017) at no
measurable cost. End to end (Wan-1.3B, 480p, H100, latents per chunk against bf16) the offset out took
the last chunk from 0.181 to 0.071 rel L2, still growing from 0.039, and with the pieces on top of it
stayed at 0.039-0.047; but the offset out costs the demo model 0.03 of its score (E4M3KVCache.smooth_values),
so the pieces alone are on (bench/RESULTS.md, fifteenth session)."""


def num_splits(keys: int) -> int:
    """The FA3 num_splits that keeps every piece at or under KEYS_PER_SPLIT keys."""
    return 1 if KEYS_PER_SPLIT is None else max(1, -(-keys // KEYS_PER_SPLIT))


def fp8_attention(q: torch.Tensor, k: E4M3, v: E4M3) -> torch.Tensor:
    """Full (unmasked) attention in e4m3: q [B, Lq, H, D] bf16, k and v [B, Lk, H, D] of the e4m3 cache
    -> [B, Lq, H, D] in q's dtype. FlashAttention-3 on CUDA (sm_90; in pieces of KEYS_PER_SPLIT keys
    where set); elsewhere its input roundings with exact fp32 attention (the CPU tests' and
    scripts/fp8_attention_emulation.py's reference). q is quantized per (batch, head) by its amax, per
    call. The values' offset comes back after the kernel: softmax's weights sum to 1, so attention to
    v - m plus m is attention to v. Keys stored rotated (k.rotation) take q rotated alike."""
    dtype = q.dtype
    if k.rotation is not None:
        q = compiled(rotated, q)(q, k.rotation)
    q8, dq = compiled(quantize_per_head, q)(q)
    if not q.is_cuda:
        from ropesp.model.kv_cache import attention

        q_back = E4M3(q8, dq, rotation=k.rotation).dequantized()
        return attention(q_back, k.dequantized(), v.dequantized()).to(dtype)
    from fa3_fwd_interface import flash_attn_func

    out = flash_attn_func(
        q8,
        k.data,
        v.data,
        q_descale=dq,
        k_descale=k.descale,
        v_descale=v.descale,
        num_splits=num_splits(k.data.shape[1]),
    )
    if v.offset is None:
        return out
    return compiled(_add_offset, out)(out, v.offset)


def _add_offset(out: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """out [B, L, H, D] + offset [B, H, D] in fp32, rounded once to out's dtype."""
    return (out.float() + offset[:, None]).to(out.dtype)


def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention through FlashAttention-3's bf16 forward. Shapes as fp8_attention."""
    from fa3_fwd_interface import flash_attn_func

    return flash_attn_func(q, k, v)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention through SageAttention (INT8 QK, fp16 PV). Shapes as fp8_attention."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def attention_unsupported_reason(
    mode: str, device: torch.device | str, head_dim: int | None = None
) -> str | None:
    """Why `mode` cannot run on device for a model of head_dim (None: not checked) (None when it can)."""
    if mode == "sdpa":
        return None
    reason = gpu_capability_reason(device, _MIN_CAPABILITY[mode], "its kernels need")
    if reason is not None:
        return reason
    dims = _HEAD_DIMS.get(mode)
    if head_dim is not None and dims is not None and head_dim not in dims:
        return f"its kernels take head dims {dims}, this model's is {head_dim} (dim / num_heads)"
    module, package = _PACKAGES[mode]
    try:
        __import__(module)
    except ImportError as exc:
        return f'it needs {package}: pip install -e ".[fp8]" (or pip install {package}); import failed: {exc}'
    return None


def check_attention(
    mode: str, device: torch.device | str, flag: str = "--attention", head_dim: int | None = None
) -> None:
    """Raise ConfigError (unknown mode, hardware, head dim) or BackendUnavailableError (library) naming
    flag."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"{flag} {mode}: choose one of {', '.join(ATTENTION_MODES)}")
    reason = attention_unsupported_reason(mode, device, head_dim)
    if reason is None:
        return
    error = BackendUnavailableError if "pip install" in reason else ConfigError
    raise error(f"{flag} {mode}: {reason}")


def kv_cache_class(mode: str) -> type:
    """The KV cache a mode attends to: the e4m3 cache for fp8, the model dtype's for the others."""
    if mode == "fp8":
        from ropesp.plugins.e4m3_cache import E4M3KVCache

        return E4M3KVCache
    from ropesp.model.kv_cache import KVCache

    return KVCache


def select_attention(mode: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The attend(q, k, v) of a mode; call check_attention first for a clear message."""
    if mode == "sdpa":
        from ropesp.model.kv_cache import attention

        return attention
    if mode == "fa3":
        return fa3_attention
    if mode == "fp8":
        return fp8_attention
    if mode == "int8":
        return int8_attention
    raise ConfigError(f"--attention {mode}: choose one of {', '.join(ATTENTION_MODES)}")
