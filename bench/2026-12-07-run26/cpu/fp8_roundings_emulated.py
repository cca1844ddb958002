"""Which FP8 GEMM rounding costs the demo model its short score: e4m3 roundings emulated in fp32 on the CPU.

    NPAIRS=96 python bench/2026-12-07-run26/cpu/fp8_roundings_emulated.py ropesp/demo/weights [VARIANT,...]

Each variant replaces apply_fp8 with some of its roundings (scripts/fp8_gemm_emulation.py's round_rows:
weights per output channel, inputs per row) on the selected Linears; prints the score over NPAIRS of
eval_pairs, and the final latents' relative L2 against the first variant (fp32), per latent frame.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from ropesp.demo.evaluate import eval_pairs, generate_latents, mean_score, score_pairs
from ropesp.plugins import fp8
from ropesp.runtime import pipeline
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))
from fp8_gemm_emulation import round_rows

PAIRS = eval_pairs(int(os.environ.get("NPAIRS", "32")))


def emulation(weights=True, inputs=True, unmerged=False, skip=None):
    """An apply_fp8 stand-in; unmerged: a stream block's weight is its base's rounded + the exact delta."""

    def emulate(model, config=None, precision="fp8"):
        names = fp8.fp8_linear_names(model, precision)
        if skip:
            names = [n for n in names if not re.search(skip, n)]
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name in names:
                lin = modules[name]
                if weights:
                    w = lin.weight.float()
                    if unmerged and name.startswith("stream_blocks"):
                        base = modules[name.removeprefix("stream_")].weight.float()
                        w = round_rows(base) + (w - base)
                    else:
                        w = round_rows(w)
                    lin.weight = torch.nn.Parameter(w, requires_grad=False)
                if inputs:
                    lin.register_forward_pre_hook(lambda _m, a: (round_rows(a[0]), *a[1:]))
        return names

    return emulate


VARIANTS = {
    "fp32": None,
    "both": {},
    "weights only": {"inputs": False},
    "inputs only": {"weights": False},
    "unmerged delta": {"unmerged": True},
    "no self_attn.o": {"skip": r"self_attn\.o"},
    "no cross_attn": {"skip": r"cross_attn"},
    "no ffn": {"skip": r"ffn"},
    "no self_attn.qkv": {"skip": r"self_attn\.[qkv]"},
}


def main() -> None:
    checkpoint = sys.argv[1]
    chosen = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
    reference = None
    for name in chosen:
        t0 = time.perf_counter()
        extra = {} if VARIANTS[name] is None else {"precision": "fp8"}
        cfg = RunConfig.of(device="cpu", checkpoint=checkpoint, dtype="float32", **extra)
        fn = None if VARIANTS[name] is None else emulation(**VARIANTS[name])
        with (
            torch.no_grad(),
            mock.patch.object(pipeline, "check_precision", lambda *a, **k: None),
            mock.patch.object(fp8, "apply_fp8", fn),
        ):
            latents = generate_latents(build_session(cfg), PAIRS)
        reference = reference or latents
        rel = torch.stack(
            [
                (a - b)[0].flatten(1).norm(dim=1) / b[0].flatten(1).norm(dim=1)
                for a, b in zip(latents, reference)
            ]
        ).mean(0)  # [F]
        score = mean_score(score_pairs(latents, PAIRS))
        frames = " ".join(f"{x:.3f}" for x in rel.tolist())
        print(
            f"{name}: {score:.3f}, rel L2 per frame {frames} ({time.perf_counter() - t0:.1f} s)", flush=True
        )


if __name__ == "__main__":
    main()
