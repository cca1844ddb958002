"""FlashAttention-3's e4m3 attention over a growing key window: its error against exact attention, and
its time, as the runtime calls it (plugins/attention_8bit.py fp8_attention over an e4m3 cache written
as plugins/e4m3_cache.py writes it), with and without the values' offset taken out and the key range
split into pieces.

    python scripts/fp8_attention_accuracy.py --json out.json            # CUDA (sm_90), fa3-fwd

Inputs (seeded, never zeros): q, k, v [1, L, 12, 128] bf16 with a per-channel offset shared by every key
(as qk-normed keys carry) and by every value (--value-offset, in units of the values' spread); the
cache's offsets and scales come from the first Lq keys (the stream's first chunk). Per window length:
  kernel  rel L2 against exact fp32 attention over the same e4m3-rounded q, k, v: the kernel's own
          error (P's rounding, the FP8 MMA's accumulation), which no input scale changes
  total   rel L2 against exact fp32 attention over the bf16 inputs
  ms      the fp8_attention call (q's quantization, the kernel, the offset added back), CUDA events,
          median of 20; cuDNN bf16 SDPA beside it
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

import torch
from cuda_timing import median_ms

from ropesp.model.kv_cache import attention
from ropesp.plugins import attention_8bit as a8
from ropesp.plugins import e4m3
from ropesp.plugins.e4m3_cache import calibrate, to_e4m3

FIXES = {"base": (False, None), "v": (True, None), "split": (False, 4680), "v+split": (True, 4680)}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref).norm() / ref.norm())


def cache_inputs(k, v, calib: int, smooth_values: bool):
    """The e4m3 cache's window for k, v [B, L, H, D] with offsets and scales from the first calib keys."""
    k_off, k_scale, v_off, v_scale = calibrate(k[:, :calib], v[:, :calib])
    if not smooth_values:
        v_off = None
        v_scale = e4m3.E4M3_MAX / (4.0 * v[:, :calib].float().abs().amax(dim=(1, 3)))
    keys = e4m3.E4M3(to_e4m3(k, k_off, k_scale), k_scale.reciprocal())
    values = e4m3.E4M3(to_e4m3(v, v_off, v_scale), v_scale.reciprocal(), v_off)
    return keys, values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=4680, help="Lq: one chunk's tokens (480p: 4680)")
    ap.add_argument("--windows", default="4680,9360,18720,32760")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--value-offset", type=float, default=1.0)
    ap.add_argument("--key-offset", type=float, default=2.0)
    ap.add_argument("--fixes", default=",".join(FIXES))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of fp8_attention's reference")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    dev = torch.device(args.device)
    time_ms = median_ms if dev.type == "cuda" else (lambda fn: float("nan"))  # the CPU reference: untimed
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (1, max(int(w) for w in args.windows.split(",")), args.heads, args.head_dim)
    k_off = args.key_offset * torch.randn(1, 1, args.heads, args.head_dim, device=dev, generator=g)
    v_off = args.value_offset * torch.randn(1, 1, args.heads, args.head_dim, device=dev, generator=g)
    k_all = (torch.randn(shape, device=dev, generator=g) + k_off).bfloat16()
    v_all = (torch.randn(shape, device=dev, generator=g) + v_off).bfloat16()
    q = torch.randn(1, args.queries, args.heads, args.head_dim, device=dev, generator=g).bfloat16()
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out = {"card": card, "torch": torch.__version__, "args": vars(args), "rows": []}
    print(out["card"], out["torch"], flush=True)
    for window in (int(w) for w in args.windows.split(",")):
        k, v = k_all[:, :window], v_all[:, :window]
        exact = attention(q.float(), k.float(), v.float())
        sdpa_ms = time_ms(lambda k=k, v=v: attention(q, k, v))
        row = {"window": window, "sdpa_bf16_ms": sdpa_ms, "sdpa_bf16_total": rel(attention(q, k, v), exact)}
        for fix in args.fixes.split(","):
            smooth, keys_per_split = FIXES[fix]
            keys, values = cache_inputs(k, v, args.queries, smooth)
            with mock.patch.object(a8, "KEYS_PER_SPLIT", keys_per_split):
                try:
                    got = a8.fp8_attention(q, keys, values)
                    ms = time_ms(lambda k=keys, v=values: a8.fp8_attention(q, k, v))
                except Exception as exc:  # a kernel configuration the build lacks
                    row[fix] = {"error": repr(exc)[-500:]}
                    print(f"{window:>6} {fix:>8}: failed {exc!r}"[:500], flush=True)
                    continue
            q8, dq = e4m3.quantize_per_head(q)
            rounded = attention(e4m3.E4M3(q8, dq).dequantized(), keys.dequantized(), values.dequantized())
            row[fix] = {"kernel": rel(got, rounded), "total": rel(got, exact), "ms": ms}
            print(
                f"{window:>6} {fix:>8}: kernel {row[fix]['kernel']:.4f} total {row[fix]['total']:.4f} "
                f"{ms:.3f} ms (cuDNN bf16 {sdpa_ms:.3f} ms, {row['sdpa_bf16_total']:.4f})",
                flush=True,
            )
        out["rows"].append(row)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
