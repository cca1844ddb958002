"""Which part of e4m3 attention costs the demo model its score: FlashAttention-3's fp8 rounding, emulated
in fp32 on the CPU, one part at a time.

    python scripts/fp8_attention_emulation.py --json out.json [--variants qkv+p,k,qkv+p/smooth-k]

Each variant replaces the runtime's attention (runtime.runners.select_attention, whatever --attention
says) with exact fp32 attention over rounded inputs: q, k and/or v through the plugin's per-head e4m3
quantization and back, and/or the unnormalized softmax P (values in [0, 1], as the kernel holds it
before P.v) rounded to e4m3; `/smooth-k` subtracts the keys' mean first (plugins/attention_8bit.py
smooth_keys). `e4m3-cache` is the runtime's own `--attention fp8` path on the CPU: the e4m3 KV cache
(plugins/e4m3_cache.py: keys and values rounded once, when written, under the stream's fixed offset and
scales) and plugins/attention_8bit.py fp8_attention's CPU reference (q rounded per call, exact softmax).
The demo model then streams the 32 evaluation pairs in fp32 eager on the CPU and is scored
as `python -m ropesp.demo.evaluate` scores it. The kernel itself needs an sm_90 GPU (tests/demo/test_gpu.py
scores it there); this tells which rounding to fix.
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch

import ropesp.runtime.runners as runners
from ropesp.demo import default_checkpoint
from ropesp.demo.evaluate import EVAL_PAIRS, eval_pairs, evaluate, mean_score
from ropesp.model.kv_cache import attention
from ropesp.plugins import attention_8bit
from ropesp.plugins.e4m3 import quantize_per_head, smooth_keys
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

VARIANTS = ("none", "qkv+p", "qkv", "p", "q", "k", "v", "qkv+p/smooth-k", "e4m3-cache")


def _rounded(x: torch.Tensor) -> torch.Tensor:
    x8, descale = quantize_per_head(x)
    return x8.float() * descale[:, None, :, None]


def emulated_attention(variant: str):
    """attend(q, k, v) [B, L, H, D] -> [B, Lq, H, D] with the variant's roundings ("none": exact)."""
    parts, _, option = variant.partition("/")
    rounded = set() if parts == "none" else set(parts.replace("+", ""))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = q.float(), k.float(), v.float()
        if option == "smooth-k":
            k = smooth_keys(k)
        q, k, v = (_rounded(t) if name in rounded else t for name, t in zip("qkv", (q, k, v)))
        if "p" not in rounded:
            return attention(q, k, v)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        p = torch.exp(s - s.amax(-1, keepdim=True))
        row_sum = p.sum(-1, keepdim=True)  # the kernel sums P before rounding it
        p = p.to(torch.float8_e4m3fn).float()
        return torch.einsum("bhqk,bkhd->bqhd", p / row_sum, v)

    return attend


def score(variant: str, pairs: int = EVAL_PAIRS) -> float:
    if variant == "e4m3-cache":
        # the fp8 mode's checks refuse the CPU (its kernel needs sm_90); its CPU reference runs here
        cfg = RunConfig.of(
            checkpoint=str(default_checkpoint()), device="cpu", dtype="float32", attention="fp8"
        )
        patch = mock.patch.object(attention_8bit, "attention_unsupported_reason", lambda *a, **k: None)
    else:
        cfg = RunConfig.of(checkpoint=str(default_checkpoint()), device="cpu", dtype="float32")
        patch = mock.patch.object(runners, "select_attention", lambda mode: emulated_attention(variant))
    with patch, torch.no_grad():
        return mean_score(evaluate(build_session(cfg), eval_pairs(pairs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {VARIANTS}")
    ap.add_argument(
        "--pairs", type=int, default=EVAL_PAIRS, help=f"the first N evaluation pairs (default: {EVAL_PAIRS})"
    )
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    results = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: {variant!r} is not one of {VARIANTS}")
        t0 = time.perf_counter()
        results[variant] = score(variant, args.pairs)
        print(f"{variant:>16}: {results[variant]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    with open(args.json, "w") as f:
        json.dump({"torch": torch.__version__, "pairs": args.pairs, "scores": results}, f, indent=1)


if __name__ == "__main__":
    main()
