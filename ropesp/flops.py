"""Matrix FLOPs of a video: what a measured time is compared against (elementwise work is not counted).

Per chunk forward, with L tokens (all ranks together), width C, FFN width F, text length T and S cache
tokens attended, each block does
    GEMMs       2·L·C·4C  (q, k, v, o)  +  2·L·C·2C  (cross-attention q, o)  +  2·L·C·2F  (FFN)
    attention   4·L·S·C   (Q·Kᵀ and P·V over the cache window)  +  4·L·T·C  (cross-attention)
and the forward adds the patch embedding 2·L·(C_in·p)·C and the head 2·L·C·(C_out·p). Cross-attention
K/V are computed once per prompt and not counted. Wan-1.3B, 832x480, 81 frames: 11.7 TFLOP of GEMMs per
forward and 4.0 to 28 TFLOP of attention as the cache grows (docs/PLATFORM.md's floor).
"""

from __future__ import annotations

from ropesp.config import CacheConfig, ModelConfig
from ropesp.settings import SamplerConfig


def forward_flops(cfg: ModelConfig, tokens: int, attended: int) -> dict[str, float]:
    """{"gemm", "attention"} FLOPs of one chunk forward of `tokens` tokens over `attended` cache tokens."""
    c, f, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    gemm = layers * 2 * tokens * c * (6 * c + 2 * f) + 2 * tokens * c * patch * (cfg.in_dim + cfg.out_dim)
    attention = layers * 4 * tokens * c * (attended + cfg.text_len)
    return {"gemm": float(gemm), "attention": float(attention)}


def video_flops(
    cfg: ModelConfig,
    frame_tokens: int,
    sampler: SamplerConfig,
    latent_frames: int,
    cache: CacheConfig,
    skip_final_refresh: bool = True,
) -> dict[str, float]:
    """{"gemm", "attention", "total"} FLOPs of one video: every chunk's denoising forwards and its
    clean-context pass (the last chunk's is skipped by default, as the session does)."""
    steps = len(sampler.steps)
    sizes = sampler.chunk_sizes(latent_frames)
    total = {"gemm": 0.0, "attention": 0.0}
    start = 0
    for index, n in enumerate(sizes):
        window = start + n if not cache.rolling else min(start + n, cache.local_attn_frames)
        forwards = steps + (0 if skip_final_refresh and index == len(sizes) - 1 else 1)
        for key, value in forward_flops(cfg, n * frame_tokens, window * frame_tokens).items():
            total[key] += forwards * value
        start += n
    total["total"] = total["gemm"] + total["attention"]
    return total
