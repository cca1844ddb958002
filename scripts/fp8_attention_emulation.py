"""Which part of e4m3 attention costs the demo model its score: FlashAttention-3's fp8 rounding, emulated
in fp32 on the CPU, one part at a time.

    python scripts/fp8_attention_emulation.py --json out.json [--variants qkv+p,k,qkv+p/smooth-k] [--latents]

Each variant replaces the runtime's attention (runtime.runners.select_attention, whatever --attention
says) with exact fp32 attention over rounded inputs: q, k and/or v through the plugin's per-head e4m3
quantization and back, and/or the unnormalized softmax P (values in [0, 1], as the kernel holds it
before P.v) rounded to e4m3; `/smooth-k` subtracts the keys' mean first (plugins/attention_8bit.py
smooth_keys); `/rot` rotates q and k by one fixed random orthogonal matrix before rounding (a Hadamard
matrix with random signs, the FlashAttention-3 paper's "incoherent processing"): (qR).(kR) = q.k, while
the rotation spreads a head's large channels over all of them, so fewer products carry the rounding
error; both options may be combined (`qk/smooth-k+rot`). `e4m3-cache` is the runtime's own `--attention
fp8` path on the CPU: the e4m3 KV cache (plugins/e4m3_cache.py: keys and values rounded once, when
written, under the stream's fixed offset and scales) and plugins/attention_8bit.py fp8_attention's CPU
reference (q rounded per call, exact softmax); `e4m3-cache/rot` the same with the cache's keys stored
rotated (E4M3KVCache.rotate_keys) and q rotated alike.
The demo model then streams the 32 evaluation pairs in fp32 eager on the CPU and is scored
as `python -m ropesp.demo.evaluate` scores it. With --latents, each variant's latents are also compared
with exact attention's over the same pairs: mean and max relative L2 per video (the score moves in steps
of one pair's frames; the latents show smaller differences). The kernel itself needs an sm_90 GPU (tests/demo/test_gpu.py
scores it there); this tells which rounding to fix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from unittest import mock

import torch

import ropesp.runtime.runners as runners
from ropesp.bench import rel_l2
from ropesp.demo import default_checkpoint
from ropesp.demo.evaluate import EVAL_PAIRS, eval_pairs, evaluate, generate_latents, mean_score
from ropesp.model.kv_cache import attention
from ropesp.plugins import attention_8bit
from ropesp.plugins.e4m3 import incoherent_rotation, quantize_per_head, smooth_keys
from ropesp.plugins.e4m3_cache import E4M3KVCache
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

ROUNDINGS = ("none", "qkv+p", "qkv", "qk", "p", "q", "k", "v")
OPTIONS = ("smooth-k", "rot")
CACHE_VARIANTS = ("e4m3-cache", "e4m3-cache/rot")
VARIANTS = (*ROUNDINGS, "qkv+p/smooth-k", "qkv+p/smooth-k+rot", *CACHE_VARIANTS)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    x8, descale = quantize_per_head(x)
    return x8.float() * descale[:, None, :, None]


def check_variant(variant: str) -> None:
    """Raise SystemExit naming --variants unless variant is ROUNDINGS[/OPTION[+OPTION]] or a CACHE_VARIANTS."""
    parts, _, options = variant.partition("/")
    if variant in CACHE_VARIANTS or (
        parts in ROUNDINGS and all(o in OPTIONS for o in options.split("+") if options)
    ):
        return
    raise SystemExit(
        f"--variants: {variant!r} is not one of {CACHE_VARIANTS} or a rounding of {ROUNDINGS} with options {OPTIONS} "
        "after a '/' (joined by '+'), e.g. qkv+p/smooth-k+rot"
    )


def random_rotation(dim: int) -> torch.Tensor:
    """[dim, dim] orthogonal, the runtime's (plugins/e4m3.py incoherent_rotation); dim a power of two."""
    rotation = incoherent_rotation(dim, "cpu")
    if rotation is None:
        raise SystemExit(f"/rot needs a head dim that is a power of two, not {dim}")
    return rotation


def emulated_attention(variant: str):
    """attend(q, k, v) [B, L, H, D] -> [B, Lq, H, D] with the variant's roundings ("none": exact)."""
    parts, _, options = variant.partition("/")
    rounded = set() if parts == "none" else set(parts.replace("+", ""))
    options = set(options.split("+")) if options else set()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = q.float(), k.float(), v.float()
        if "smooth-k" in options:
            k = smooth_keys(k)
        if "rot" in options:
            rotation = random_rotation(q.shape[-1])
            q, k = q @ rotation, k @ rotation
        q, k, v = (_rounded(t) if name in rounded else t for name, t in zip("qkv", (q, k, v)))
        if "p" not in rounded:
            return attention(q, k, v)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        p = torch.exp(s - s.amax(-1, keepdim=True))
        row_sum = p.sum(-1, keepdim=True)  # the kernel sums P before rounding it
        p = p.to(torch.float8_e4m3fn).float()
        return torch.einsum("bhqk,bkhd->bqhd", p / row_sum, v)

    return attend


def variant_session(variant: str):
    """The demo model's session (fp32, CPU) with the variant's attention, and the patch that installs it."""
    if variant in CACHE_VARIANTS:
        # the fp8 mode's checks refuse the CPU (its kernel needs sm_90); its CPU reference runs here
        cfg = RunConfig.of(
            checkpoint=str(default_checkpoint()), device="cpu", dtype="float32", attention="fp8"
        )
        patch = contextlib.ExitStack()
        patch.enter_context(
            mock.patch.object(attention_8bit, "attention_unsupported_reason", lambda *a, **k: None)
        )
        patch.enter_context(mock.patch.object(E4M3KVCache, "rotate_keys", variant.endswith("/rot")))
    else:
        cfg = RunConfig.of(checkpoint=str(default_checkpoint()), device="cpu", dtype="float32")
        patch = mock.patch.object(runners, "select_attention", lambda mode: emulated_attention(variant))
    return cfg, patch


def score(variant: str, pairs: int = EVAL_PAIRS) -> float:
    cfg, patch = variant_session(variant)
    with patch, torch.no_grad():
        return mean_score(evaluate(build_session(cfg), eval_pairs(pairs)))


def latents(variant: str, pairs: int) -> list[torch.Tensor]:
    cfg, patch = variant_session(variant)
    with patch, torch.no_grad():
        return generate_latents(build_session(cfg), eval_pairs(pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    ap.add_argument(
        "--pairs", type=int, default=EVAL_PAIRS, help=f"the first N evaluation pairs (default: {EVAL_PAIRS})"
    )
    ap.add_argument(
        "--latents",
        action="store_true",
        help="also each variant's latents against exact attention's (rel L2)",
    )
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    variants = args.variants.split(",")
    for variant in variants:
        check_variant(variant)
    results, errors = {}, {}
    exact = latents("none", args.pairs) if args.latents else None
    for variant in variants:
        t0 = time.perf_counter()
        results[variant] = score(variant, args.pairs)
        line = f"{variant:>20}: score {results[variant]:.3f}"
        if exact is not None:
            rel = [rel_l2(x, ref) for x, ref in zip(latents(variant, args.pairs), exact)]
            errors[variant] = {"mean_rel_l2": sum(rel) / len(rel), "max_rel_l2": max(rel)}
            line += f", latents rel L2 mean {errors[variant]['mean_rel_l2']:.4f} max {max(rel):.4f}"
        print(f"{line} ({time.perf_counter() - t0:.0f} s)", flush=True)
    report = {"torch": torch.__version__, "pairs": args.pairs, "scores": results}
    if errors:
        report["latents_vs_exact"] = errors
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
