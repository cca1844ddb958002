"""On a Hopper GPU: the 8-bit attention kernels against SDPA, and the fp8 pipeline against bf16.

Bounds come from the H200 measurements in bench/2026-12-01-fp8 (N(0,1) inputs, rel L2 against fp32
attention): FlashAttention-3 bf16 0.0023, e4m3 0.053, SageAttention 0.013-0.015; each bound here is about
1.5x the measured error. Skipped where the GPU or the library is missing (CI has no GPU).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ropesp.plugins import attention_8bit as a8
from ropesp.plugins.fp8 import fp8_unsupported_reason

pytestmark = pytest.mark.gpu


def _skip_unless(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize(("mode", "bound"), [("fa3", 0.004), ("fp8", 0.08), ("int8", 0.025)])
def test_attention_kernel_matches_fp32_sdpa(mode, bound):
    _skip_unless(a8.attention_unsupported_reason(mode, "cuda"))
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(1, 700, 4, 128, device="cuda", generator=g).bfloat16()  # [B, Lq, H, D]
    k = torch.randn(1, 1500, 4, 128, device="cuda", generator=g).bfloat16()  # [B, Lk, H, D]
    v = torch.randn(1, 1500, 4, 128, device="cuda", generator=g).bfloat16()
    ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    with torch.inference_mode():
        out = a8.select_attention(mode)(q, k, v)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < bound, rel


def _model_config(tmp_path) -> str:
    """Two layers of six 128-dim heads: the head size FlashAttention-3's kernels are built for."""
    path = tmp_path / "config.json"
    cfg = {"dim": 768, "ffn_dim": 2048, "freq_dim": 256, "num_heads": 6, "num_layers": 2}
    path.write_text(json.dumps({**cfg, "in_dim": 16, "out_dim": 16}))
    return str(path)


def _latents(tmp_path, **fields) -> torch.Tensor:
    from ropesp.runtime.pipeline import PipelineConfig, build_session
    from ropesp.runtime.prompts import default_prompt_embeds

    config = PipelineConfig(
        model_config=_model_config(tmp_path),
        latent_height=16,
        latent_width=16,
        latent_frames=6,
        backend="compile",
        device="cuda",
        dtype="bfloat16",
        **fields,
    )
    session = build_session(config)
    session.reset(default_prompt_embeds(session.executor.cfg), seed=0)
    return torch.cat([c.latents.float().cpu() for c in session], dim=1)


@pytest.mark.parametrize("attention", ["sdpa", "fp8"])
def test_fp8_pipeline_is_close_to_bf16(tmp_path, attention):
    _skip_unless(fp8_unsupported_reason("cuda") or a8.attention_unsupported_reason(attention, "cuda"))
    bf16 = _latents(tmp_path)
    fp8 = _latents(tmp_path, precision="fp8", attention=attention)
    assert torch.isfinite(fp8).all()
    rel = ((fp8 - bf16).norm() / bf16.norm()).item()
    # Wan-1.3B, 81 frames: 0.044 (GEMMs) and 0.126 (GEMMs + attention) against bf16
    assert 0 < rel < (0.1 if attention == "sdpa" else 0.2), rel
