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
from ropesp.plugins import e4m3
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
    if mode == "fp8":  # the kernel reads k and v from the e4m3 cache: one descale per (batch, head)
        k, v = (e4m3.E4M3(*e4m3.quantize_per_head(t)) for t in (k, v))
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
    from ropesp.runtime.pipeline import build_session
    from ropesp.runtime.prompts import default_prompt_embeds
    from ropesp.settings import RunConfig

    config = RunConfig.of(
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


def _assert_codes_close(got, want, differing: float) -> None:
    """The kernel's (x8, scale) against the reference's: the same scales to fp32 rounding, and codes
    that differ only where a value lands on the other side of a rounding boundary (at most `differing`
    of them): one e4m3 step, 2^-3 of the value in the normal range, a subnormal step (2^-9 of the
    scale) below it."""
    (x8, scale), (ref8, ref_scale) = got, want
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == ref8.shape and scale.shape == ref_scale.shape
    torch.testing.assert_close(scale, ref_scale, rtol=1e-5, atol=0)
    assert (x8.view(torch.uint8) != ref8.view(torch.uint8)).float().mean().item() <= differing
    back, ref = x8.float() * scale, ref8.float() * ref_scale
    assert ((back - ref).abs() <= ref.abs() * 2**-3 + 2**-9 * ref_scale).all()


@pytest.mark.parametrize("shape", [(4680, 8960), (37, 2048), (5, 13824)])
def test_gelu_quant_kernel_matches_the_reference(shape):
    """GELU: the kernel's approximate tanh (relative error ~2^-11) moves about 2^-11 / 2^-4 of the
    codes across a boundary; 3 % bounds it."""
    from ropesp.plugins.e4m3_rows import gelu_quant_e4m3, gelu_quant_ref

    _skip_unless(fp8_unsupported_reason("cuda"))
    g = torch.Generator("cuda").manual_seed(0)
    h = (torch.randn(*shape, device="cuda", generator=g) * 3).bfloat16()
    _assert_codes_close(gelu_quant_e4m3(h), gelu_quant_ref(h), 0.03)


@pytest.mark.parametrize("shape", [(4680, 1536), (37, 5120), (3, 1000)])
def test_quant_and_norm_kernels_match_the_references(shape):
    """Plain, affine-norm and modulated-norm quantization against their fp32 references (the norms'
    statistics summed in another order: codes differ at a few boundaries only, 1 % bounds them); the
    plain input with a row stride (an attention output's view), the modulated one over two batches of
    three frames' tables."""
    from ropesp.plugins import e4m3_rows as r

    _skip_unless(fp8_unsupported_reason("cuda"))
    m, k = shape
    g = torch.Generator("cuda").manual_seed(1)
    wide = (torch.randn(m, k + 64, device="cuda", generator=g) * 4 + 1).bfloat16()
    x = wide[:, :k]  # row stride k + 64
    # bf16 inputs keep 8 significant bits, so many sit exactly on a tie between two e4m3 neighbours,
    # where the last bit of x * (448 / amax) against x / (amax / 448) picks the other one: 0.06 %
    # measured at [4680, 1536]
    _assert_codes_close(r.quant_e4m3(x), r.quant_ref(x), 0.002)
    weight, bias = (torch.randn(2, k, device="cuda", generator=g) * 0.5 + 1).bfloat16().unbind(0)
    _assert_codes_close(
        r.norm_quant_e4m3(x, weight, bias, 1e-6), r.norm_quant_ref(x, weight, bias, 1e-6), 0.01
    )
    # the tables as the block passes them: strided views of its [B, F, 6, K] modulation
    mod = (torch.randn(2, 3, 6, k, device="cuda", generator=g) * 0.5).bfloat16()
    shift, scale = mod[:, :, 0], mod[:, :, 1]
    xb = x[: m - m % 2].unflatten(0, (2, -1))  # [2, L, K], rows still k + 64 apart
    frame_of_token = torch.randint(0, 3, (xb.shape[1],), device="cuda", generator=g)
    _assert_codes_close(
        r.modulated_norm_quant_e4m3(xb, shift, scale, frame_of_token, 1e-6),
        r.modulated_norm_quant_ref(xb, shift, scale, frame_of_token, 1e-6),
        0.01,
    )


def test_fp8_ffn_compiled_and_captured_is_close_to_bf16():
    """FP8FeedForward under torch.compile and a CUDA graph (as the compile backend runs it): the replay
    matches the compiled call it captured, and eager and compiled are each within FP8's error of the
    bf16 FFN (Wan-1.3B's FFN sizes): measured ~0.04 for the block's FP8 GEMM stages."""
    from torchao.quantization import quantize_

    from ropesp.model.wan import FeedForward
    from ropesp.plugins.fp8 import default_config
    from ropesp.plugins.fp8_layers import FP8FeedForward

    _skip_unless(fp8_unsupported_reason("cuda"))
    torch.manual_seed(0)
    bf16 = FeedForward(1536, 8960).cuda().bfloat16().requires_grad_(False)
    ffn = FeedForward(1536, 8960).cuda().bfloat16().requires_grad_(False)
    ffn.load_state_dict(bf16.state_dict())
    quantize_(ffn, default_config())
    FP8FeedForward.from_quantized(ffn)
    x = torch.randn(1, 4680, 1536, device="cuda").bfloat16()
    compiled = torch.compile(ffn, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        eager, ref = ffn(x), bf16(x)
        uncaptured = compiled(x)
        graph = torch.cuda.CUDAGraph()
        static_x = x.clone()
        with torch.cuda.graph(graph):
            out = compiled(static_x)
        graph.replay()
    # same kernels, but cuBLAS may pick another algorithm under capture: equal to bf16's last bits
    torch.testing.assert_close(out, uncaptured)
    for got in (eager, out):
        rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert torch.isfinite(got).all() and rel < 0.08, rel
        print(f"rel L2 vs bf16: {rel:.4f}")


def test_adapted_linear_on_the_gpu_is_the_base_gemm_plus_the_delta():
    """E4M3AdaptedLinear through `_scaled_mm` (the stream blocks under FP8 GEMMs), eager and compiled:
    the base block's E4M3Linear output plus the adapter's delta on the same rounded input, to bf16's
    rounding of the sum; within FP8's error of the merged bf16 Linear (demo-model sizes)."""
    from torchao.quantization import quantize_

    from ropesp.model.wan import LowRankDelta
    from ropesp.plugins.e4m3_rows import quant_e4m3
    from ropesp.plugins.fp8 import default_config
    from ropesp.plugins.fp8_layers import E4M3AdaptedLinear, E4M3Linear

    _skip_unless(fp8_unsupported_reason("cuda"))
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512).cuda().bfloat16().requires_grad_(False)
    delta = LowRankDelta(64, 256, 512).cuda()
    torch.nn.init.normal_(delta.up, std=0.05)
    merged = linear.weight.float() + delta.delta()  # [512, 256]
    quantize_(linear, default_config())
    base = E4M3Linear.from_quantized(linear)
    adapted = E4M3AdaptedLinear.of(base, delta)
    x = torch.randn(3, 1200, 256, device="cuda").bfloat16()
    with torch.inference_mode():
        x8, x_scale = quant_e4m3(x.flatten(0, 1))
        rounded = (x8.float() * x_scale).bfloat16()
        want = base(x).float() + (rounded.float() @ delta.delta().t()).unflatten(0, (3, 1200))
        for got in (adapted(x), torch.compile(adapted, fullgraph=True, dynamic=False)(x)):
            torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=0.03)
        ref = F.linear(x.float(), merged, linear.bias.float())
        rel = ((adapted(x).float() - ref).norm() / ref.norm()).item()
    assert rel < 0.08, rel
