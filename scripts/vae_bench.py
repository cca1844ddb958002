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
- compile-channels-last: both.
Per chunk: milliseconds between CUDA events around `decode_video` (host clocks on the CPU), median of
--repeat videos after one warm-up video (two for the compiled variants: one graph per cache state).
Every variant's frames are compared with eager's (max |d| on [-1, 1] pixels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ropesp.decode.wan_vae import WanVAEDecoder

VARIANTS = ("eager", "cudnn-benchmark", "channels-last", "compile", "compile-channels-last")


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

    results, reference = {}, None
    for name in variants:
        torch.backends.cudnn.benchmark = name != "eager"
        decoder = WanVAEDecoder(
            vae, channels_last=name.endswith("channels-last"), compile=name.startswith("compile")
        )
        t0 = time.perf_counter()
        for _ in range(2 if name.startswith("compile") else 1):
            decode_video_ms(decoder, latents, args.chunk, device)
        warmup_s = time.perf_counter() - t0
        runs = [decode_video_ms(decoder, latents, args.chunk, device) for _ in range(args.repeat)]
        video = runs[0][1]
        if reference is None:
            reference = video
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
        first = results[variants[0]]["video_ms"]
        print(
            f"{name:>22}: video {total:8.1f} ms ({video.shape[2]} frames, {first / total:5.2f}x vs {variants[0]}), "
            f"chunks {' '.join(f'{t:.1f}' for t in per_chunk)} ms, warm-up {warmup_s:.1f} s, "
            f"max|d| {results[name]['max_abs_vs_first']:.4f}",
            flush=True,
        )
        del decoder
        torch._dynamo.reset()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"card": card, "torch": torch.__version__, "args": vars(args), "results": results},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
