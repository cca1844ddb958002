"""Where e4m3 attention's error grows chunk by chunk: the DiT streamed in fp32 on the CPU (or on a GPU)
with FlashAttention-3's fp8 roundings emulated one part at a time, each chunk's latents against exact
attention.

    python scripts/fp8_attention_drift.py --preset wan2.1-1.3b --layers 6 --latent-height 16 \\
        --latent-width 16 --json out.json [--variants sdpa,cache,cache+p,...]

On the GPU, FP8 attention's latents drift from bf16 (relative L2 per chunk 0.045 -> 0.181 over 7 chunks
at 480p, bench/RESULTS.md) while FP8 GEMMs alone stay flat; this reproduces the mechanism at a size a
2-core CPU streams in minutes (same seed, same random weights, same noise for every variant).

Variants (each replaces the runtime's attention; `sdpa` is the reference):
  sdpa        exact fp32 attention over an fp32 cache
  cache       the runtime's `--attention fp8` CPU path: plugins/e4m3_cache.py writes keys (less the
              stream's offset) and values once, in e4m3, under scales fixed by the first chunk; q rounded
              per call (plugins/attention_8bit.py fp8_attention's reference); exact softmax
  cache+p     as cache, and P rounded to e4m3 before P.v as FlashAttention-3's fp8 kernel does (P =
              exp(s - rowmax + 8): its fp8 path offsets the max by 8, so P spans [0, 256]); row sums
              of the unrounded P
  q, k, v, p  one rounding alone, per call over an fp32 cache (per-head amax scales, as
              quantize_per_head)
  qkv+p       every rounding per call (scales from each call's window)
  gemm        FP8 GEMMs (`--precision fp8`), attention sdpa (on CUDA: torchao's e4m3 GEMMs)
  fp8:FIX     FP8 GEMMs and `--attention fp8` as the runtime runs it (FlashAttention-3 on CUDA, its
              CPU reference elsewhere) with the e4m3 cache configured as FIX:
  attn:FIX    the same with bf16 GEMMs
FIX: base (today's: values not smoothed, the whole window in one kernel program), v (the values'
offset taken out, plugins/e4m3_cache.py smooth_values), split (pieces of KEYS_PER_SPLIT keys,
plugins/attention_8bit.py), v+split (both), split+rot (the pieces, and the keys stored rotated with q
rotated alike: plugins/e4m3_cache.py rotate_keys). The committed default is split.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

import ropesp.runtime.runners as runners
from ropesp.bench import per_chunk_errors, rel_l2
from ropesp.config import preset as preset_config
from ropesp.model.kv_cache import attention
from ropesp.plugins import attention_8bit, e4m3_cache
from ropesp.plugins.e4m3 import E4M3, quantize_per_head
from ropesp.runtime.pipeline import build_session, resolve
from ropesp.runtime.prompts import default_prompt_embeds
from ropesp.settings import RunConfig

FA3_P_OFFSET = 8.0
"""FlashAttention-3's fp8 forward subtracts rowmax - 8 (log2 units) before exp2, so P <= 2^8."""


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x (fp32, within e4m3's range) rounded to e4m3 and back."""
    return x.to(torch.float8_e4m3fn).float()


def per_head_rounded(x: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, D] through quantize_per_head and back (fp32)."""
    x8, descale = quantize_per_head(x)
    return E4M3(x8, descale).dequantized()


def attention_p_rounded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention with P rounded to e4m3 as FlashAttention-3's fp8 kernel holds it: q, k, v [B, L, H, D]
    fp32 -> [B, Lq, H, D] fp32. Row sums of the unrounded P, as the kernel accumulates them."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5  # [B, H, Lq, Lk]
    log2e = 1.4426950408889634
    p = torch.exp2((s - s.amax(-1, keepdim=True)) * log2e + FA3_P_OFFSET)
    row_sum = p.sum(-1, keepdim=True)
    return torch.einsum("bhqk,bkhd->bqhd", round_e4m3(p) / row_sum, v)


def per_call(parts: str) -> Callable:
    """attend(q, k, v) over an fp32 cache with the named roundings (of 'qkvp') applied per call."""

    def attend(q, k, v):
        q, k, v = q.float(), k.float(), v.float()
        q, k, v = (per_head_rounded(t) if n in parts else t for n, t in zip("qkv", (q, k, v)))
        return (attention_p_rounded if "p" in parts else attention)(q, k, v)

    return attend


def cache_attend(p_rounded: bool) -> Callable:
    """attend(q, k: E4M3, v: E4M3) of the e4m3 cache: q rounded per call, optionally P as the kernel."""

    def attend(q, k, v):
        q_back = per_head_rounded(q.float())
        kf, vf = k.dequantized(), v.dequantized()
        out = attention_p_rounded(q_back, kf, vf) if p_rounded else attention(q_back, kf, vf)
        return out.to(q.dtype)

    return attend


FIXES = {  # FIX -> (E4M3KVCache.smooth_values, KEYS_PER_SPLIT, E4M3KVCache.rotate_keys)
    "base": (False, None, False),
    "v": (True, None, False),
    "split": (False, 4680, False),
    "v+split": (True, 4680, False),
    "split+rot": (False, 4680, True),
}


def fix_patches(fix: str) -> list:
    if fix not in FIXES:
        raise SystemExit(f"unknown fix {fix!r}; choose from {sorted(FIXES)}")
    smooth, keys, rotate = FIXES[fix]
    return [
        mock.patch.object(e4m3_cache.E4M3KVCache, "smooth_values", smooth),
        mock.patch.object(attention_8bit, "KEYS_PER_SPLIT", keys),
        mock.patch.object(e4m3_cache.E4M3KVCache, "rotate_keys", rotate),
    ]


def patches(variant: str, precision: str) -> tuple[str, str, list]:
    """(precision, attention mode, patchers) for a variant."""
    if variant == "sdpa":
        return precision, "sdpa", []
    if variant == "gemm":
        return "fp8", "sdpa", []
    allow = mock.patch.object(attention_8bit, "attention_unsupported_reason", lambda *a, **k: None)
    kind, _, fix = variant.partition(":")
    if kind in ("fp8", "attn") and fix:
        return ("fp8" if kind == "fp8" else precision), "fp8", [allow, *fix_patches(fix)]
    if variant in ("cache", "cache+p"):
        attend = cache_attend(variant == "cache+p")
        return precision, "fp8", [allow, mock.patch.object(runners, "select_attention", lambda mode: attend)]
    parts = variant.replace("+", "")
    if not parts or set(parts) - set("qkvp"):
        raise SystemExit(f"unknown variant {variant!r}")
    attend = per_call(parts)
    return precision, "sdpa", [mock.patch.object(runners, "select_attention", lambda mode: attend)]


def stream(args, model_config: str | None, variant: str) -> tuple[torch.Tensor, list[int]]:
    """[B, F, C, h, w] fp32 latents of one seeded video with the variant's attention; chunk sizes."""
    precision, mode, patchers = patches(variant, args.precision)
    if args.demo:
        from ropesp.demo import default_checkpoint

        source = {"checkpoint": str(default_checkpoint())}
    else:
        source = {"model_config": model_config} if model_config else {"preset": args.preset}
    config = RunConfig.of(
        **source,
        latent_height=args.latent_height,
        latent_width=args.latent_width,
        latent_frames=args.latent_frames,
        dtype=args.dtype,
        backend=args.backend,
        device=args.device,
        precision=precision,
        attention=mode,
    )
    with ExitStack() as stack, torch.inference_mode():
        for p in patchers:
            stack.enter_context(p)
        res = resolve(config)
        chunks = res.config.sampler.chunk_sizes(res.latent_frames)
        session = build_session(res)
        videos = []
        for seed in range(args.seeds):
            session.reset(default_prompt_embeds(res.model), seed=seed)
            videos.append(torch.cat([c.latents.float().cpu() for c in session], dim=1))
        latents = torch.cat(videos, dim=0)  # the seeds as a batch: [seeds, F, C, h, w]
        del session
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return latents, chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--layers", type=int, help="keep the preset's first N layers' shape (CPU time)")
    ap.add_argument("--demo", action="store_true", help="the shipped demo model instead of --preset")
    ap.add_argument("--seeds", type=int, default=1, help="videos (seeds 0..N-1), errors over all of them")
    ap.add_argument("--latent-height", type=int, default=16)
    ap.add_argument("--latent-width", type=int, default=16)
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="eager")
    ap.add_argument("--precision", default="bf16", help="the GEMMs' of every variant but gemm and fp8:*")
    ap.add_argument("--variants", default="sdpa,cache,cache+p,q,k,v,p")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    model_config = None
    if args.layers:
        cfg, _ = preset_config(args.preset)
        fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}
        fields["num_layers"] = args.layers
        model_config = str(Path(tempfile.mkdtemp()) / "config.json")
        Path(model_config).write_text(json.dumps(fields))
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    out = {"args": vars(args), "card": card, "torch": torch.__version__, "headroom": e4m3_cache.HEADROOM}
    out["variants"] = {}
    print(card, torch.__version__, flush=True)
    reference = None
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        try:
            latents, chunks = stream(args, model_config, variant)
        except Exception as exc:  # one variant failing (a kernel missing) leaves the others' numbers
            out["variants"][variant] = {"error": repr(exc)[-2000:]}
            print(f"{variant:>12}: failed: {exc!r}"[:2000], flush=True)
            continue
        if reference is None:
            reference = latents
        row = {"seconds": time.perf_counter() - t0, "abs_mean": float(latents.abs().mean())}
        row.update(rel_l2=rel_l2(latents, reference), **per_chunk_errors(latents, reference, chunks))
        out["variants"][variant] = row
        per = " ".join(f"{r:.4f}" for r in row["rel_l2_per_chunk"])
        print(
            f"{variant:>12}: rel L2 {row['rel_l2']:.4f}, per chunk {per} ({row['seconds']:.0f} s)", flush=True
        )
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
