"""Time the streaming Wan2.1 VAE decoder (full size, random weights) at 832x480, and ways of running it.

    python scripts/vae_bench.py --json vae_decode.json                  # CUDA, bf16, every variant
    python scripts/vae_bench.py --device cpu --dtype float32 --latent-height 4 --latent-width 4 \\
        --latent-frames 6 --variants eager,channels-last --tiny          # smoke check

Variants, each on the same VAE weights and latents, decoded chunk by chunk (3 latent frames) as a
session does:
- eager: `WanVAEDecoder` in the default memory layout (cuDNN's heuristic convolution algorithms);
- cudnn-benchmark: `torch.backends.cudnn.benchmark = True` (autotuned algorithms; stays on for the rest);
- channels-last: convolution weights, and so the activations, NDHWC (`set_conv_layout`; the default on CUDA);
- compile: `WanVAEDecoder(compile=True)` (Inductor around the convolutions), default layout;
- compile-channels-last: both (`--vae-compile`);
- fast: `FastWanDecoder` (ropesp/decode/wan_fast.py: in-place causal caches, fused passes, channels-last,
  CUDA graphs per latent frame); fast-eager: the same without CUDA graphs; fast-cudnn: fast with its
  convolutions through cuDNN's graph API, the fastest plan per shape (ropesp/decode/cudnn_conv.py).
Per chunk: milliseconds between CUDA events around `decode_video` (host clocks on the CPU), median of
--repeat videos after one warm-up video (two for the compiled variants: one graph per cache state).
Every variant's frames are compared with the first variant's (max |d| on [-1, 1] pixels) and, with
--fp32-reference, with one fp32 decode of the same weights (eager, TF32 off): mean and max |d|.
--profile: one more video per variant under the profiler, its CUDA kernel time by kind and the top kernels.
--conv-bench: every distinct convolution of the fast decoder's workspace timed alone (cuDNN), TF/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch
import torch.nn.functional as F

from ropesp.decode.wan_fast import FastWanDecoder
from ropesp.decode.wan_vae import WanVAEDecoder

VARIANTS = (
    "eager",
    "cudnn-benchmark",
    "channels-last",
    "compile",
    "compile-channels-last",
    "fast",
    "fast-eager",
    "fast-cudnn",
)
KINDS = (  # kernel name fragments -> kind, first match wins
    (("_norm_silu", "_upsample_kernel"), "fast passes (Triton)"),
    (
        (
            "conv",
            "xmma",
            "implicit",
            "cudnn",
            "cutlass",
            "sm90_",
            "fprop",
            "gemm",
            "nchwToNhwc",
            "nhwcToNchw",
        ),
        "convolutions",
    ),
    (("triton",), "Inductor (Triton)"),
    (("copy", "Memcpy", "Memset", "cat", "CatArray", "pad"), "copies"),
    (("flash", "fmha", "attention", "softmax"), "attention"),
)


def decode_video_ms(
    decoder: WanVAEDecoder, latents: torch.Tensor, chunk: int, device
) -> tuple[list, torch.Tensor]:
    """Per-chunk decode milliseconds of one video latents [1, F, C, h, w]; and the decoded video."""
    decoder.reset()
    times, out = [], []
    for start in range(0, latents.shape[1], chunk):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out.append(decoder.decode_video(latents[:, start : start + chunk]))
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out.append(decoder.decode_video(latents[:, start : start + chunk]))
            times.append((time.perf_counter() - t0) * 1e3)
    return times, torch.cat(out, dim=2)


def kind_of(name: str) -> str:
    return next((kind for parts, kind in KINDS if any(p in name for p in parts)), "other")


def profile_video(decoder, latents: torch.Tensor, chunk: int, device) -> dict:
    """CUDA kernel milliseconds of one video by kind, and the 15 costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode_video_ms(decoder, latents, chunk, device)
        torch.cuda.synchronize(device)
    kernels = {}
    for e in prof.key_averages():
        if e.device_time_total > 0:
            kernels[e.key] = kernels.get(e.key, 0.0) + e.device_time_total / 1e3
    kinds: dict[str, float] = {}
    for name, ms in kernels.items():
        kinds[kind_of(name)] = kinds.get(kind_of(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    return {"kinds_ms": kinds, "total_ms": sum(kernels.values()), "top": [[k[:140], v] for k, v in top]}


def conv_bench(decoder: FastWanDecoder, latents: torch.Tensor, device) -> list[dict]:
    """Each distinct convolution of the fast decoder's workspace for these latents, alone: its input
    as the decoder holds it (steady frames), CUDA events, median of 20 after 3."""
    b, _, _, h, w = latents.shape
    ws = decoder.engine.workspace(b, h, w)
    cases, seen = [], set()
    for conv in ws.convs.values():
        x, weight = conv.buf, conv.conv.weight
        key = (tuple(x.shape), tuple(weight.shape))
        if key not in seen:
            seen.add(key)
            cases.append(
                (f"conv3d {tuple(weight.shape[:2])} k{tuple(weight.shape[2:])}", x, weight, conv.conv.bias, 3)
            )
    for up_id, padded in ws.upsample.items():
        module = next(m for m in decoder.vae.decoder.modules() if id(m) == up_id)
        conv2d = module.resample[1]
        cases.append((f"conv2d {tuple(conv2d.weight.shape[:2])}", padded, conv2d.weight, conv2d.bias, 2))
    rows = []
    for name, x, weight, bias, dims in cases:
        x = x.clone().normal_()  # never time zeros
        fn = F.conv3d if dims == 3 else F.conv2d
        for _ in range(3):
            out = fn(x, weight, bias)
        times = []
        for _ in range(20):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = fn(x, weight, bias)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        ms = statistics.median(times)
        flops = 2 * out.numel() * weight[0].numel()
        rows.append({"conv": name, "input": list(x.shape), "ms": ms, "tflops": flops / ms / 1e9})
        print(f"  {name:>34} in {list(x.shape)}: {ms:7.3f} ms, {flops / ms / 1e9:6.0f} TF/s", flush=True)
    return rows


def make(name: str, vae):
    if name.startswith("fast"):  # channels-last and (for "fast") CUDA graphs where on CUDA
        graphs = None if name != "fast-eager" else False
        return FastWanDecoder(vae, cuda_graphs=graphs, cudnn_graphs=name == "fast-cudnn")
    return WanVAEDecoder(
        vae, channels_last=name.endswith("channels-last"), compile=name.startswith("compile")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--latent-height", type=int, default=60)
    ap.add_argument("--latent-width", type=int, default=104)
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--chunk", type=int, default=3, help="latent frames per decode call")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tiny", action="store_true", help="a reduced-width VAE (CPU smoke check)")
    ap.add_argument("--fp32-reference", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--conv-bench", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**({"base_dim": 8, "z_dim": 16} if args.tiny else {}))
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    latents = torch.randn(1, args.latent_frames, 16, args.latent_height, args.latent_width, device=device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{card}, torch {torch.__version__}, {args.dtype}, latents {tuple(latents.shape)}")

    exact = None
    if args.fp32_reference:
        import copy

        with torch.backends.cudnn.flags(allow_tf32=False):
            fp32 = WanVAEDecoder(copy.deepcopy(vae).float(), channels_last=False)
            exact = decode_video_ms(fp32, latents, args.chunk, device)[1]
        del fp32
    results, reference = {}, None
    for name in variants:
        torch.backends.cudnn.benchmark = name != "eager"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            decoder = make(name, vae)
            t0 = time.perf_counter()
            for _ in range(2 if name.startswith("compile") else 1):
                decode_video_ms(decoder, latents, args.chunk, device)
            warmup_s = time.perf_counter() - t0
            runs = [decode_video_ms(decoder, latents, args.chunk, device) for _ in range(args.repeat)]
        except Exception:  # one variant failing leaves the others' numbers
            results[name] = {"error": traceback.format_exc()[-3000:]}
            print(f"{name:>22}: failed\n{results[name]['error']}", flush=True)
            torch._dynamo.reset()
            continue
        video = runs[0][1]
        if reference is None:
            reference, first = video, name
        per_chunk = [statistics.median(r[0][i] for r in runs) for i in range(len(runs[0][0]))]
        total = statistics.median(sum(r[0]) for r in runs)
        results[name] = {
            "chunk_ms": per_chunk,
            "video_ms": total,
            "frames": video.shape[2],
            "warmup_s": warmup_s,
            "max_abs_vs_first": (video - reference).abs().max().item(),
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        if exact is not None:
            err = (video - exact).abs()
            results[name].update(vs_fp32_mean=err.mean().item(), vs_fp32_max=err.max().item())
        if args.profile and device.type == "cuda":
            results[name]["profile"] = profile_video(decoder, latents, args.chunk, device)
        if args.conv_bench and name.startswith("fast") and device.type == "cuda":
            results[name]["convs"] = conv_bench(decoder, latents, device)
        graph_convs = getattr(getattr(decoder, "engine", None), "run_conv", None)
        if hasattr(graph_convs, "summary"):  # cuDNN graphs: each signature's plan, or why PyTorch's stays
            rows = results[name]["cudnn_plans"] = graph_convs.summary()
            for row in rows:
                chosen = (
                    f"plan {row['index']} {row['ms']:.3f} ms"
                    if row["graph"]
                    else f"PyTorch's ({row.get('refused', '?')[:90]})"
                )
                print(
                    f"  cuDNN {row['input']} <- w {row['weight'][:2]}{' +b' if row['bias'] else ''}: {chosen}, "
                    f"torch {row.get('torch_ms', float('nan')):.3f} ms, built {row.get('built')} of "
                    f"{row.get('plans')} in {row.get('build_s', 0):.1f} s",
                    flush=True,
                )
            results[name]["cudnn_build_s"] = sum(r.get("select_s", r.get("build_s", 0)) for r in rows)
        first_ms = results[first]["video_ms"]
        print(
            f"{name:>22}: video {total:8.1f} ms ({video.shape[2]} frames, {first_ms / total:5.2f}x vs {first}), "
            f"chunks {' '.join(f'{t:.1f}' for t in per_chunk)} ms, warm-up {warmup_s:.1f} s, "
            f"max|d| {results[name]['max_abs_vs_first']:.4f}"
            + (
                f", vs fp32 mean {results[name]['vs_fp32_mean']:.5f} max {results[name]['vs_fp32_max']:.4f}"
                if exact is not None
                else ""
            )
            + (f", peak {results[name]['peak_gib']:.2f} GiB" if device.type == "cuda" else ""),
            flush=True,
        )
        if "profile" in results[name]:
            prof = results[name]["profile"]
            kinds = ", ".join(
                f"{k} {v:.0f}" for k, v in sorted(prof["kinds_ms"].items(), key=lambda kv: -kv[1])
            )
            print(f"{'':>24}kernels {prof['total_ms']:.0f} ms: {kinds}", flush=True)
        del decoder
        torch._dynamo.reset()
        if args.json:  # after every variant: a later one cut by the time limit leaves the earlier
            with open(args.json, "w") as f:
                json.dump(
                    {"card": card, "torch": torch.__version__, "args": vars(args), "results": results},
                    f,
                    indent=1,
                )


if __name__ == "__main__":
    main()
