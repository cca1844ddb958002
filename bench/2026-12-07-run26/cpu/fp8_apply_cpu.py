"""apply_fp8 itself on the CPU (torchao's weight-only e4m3 config for the weights, E4M3Linear's per-row
input rounding) against the model's dtype, on the demo model's short score.

    NPAIRS=96 python bench/2026-12-07-run26/cpu/fp8_apply_cpu.py ropesp/demo/weights [CHECKPOINT ...]
"""

from __future__ import annotations

import os
import sys
import time
from unittest import mock

import torch
from torchao.quantization import Float8WeightOnlyConfig

from ropesp.demo.evaluate import eval_pairs, generate_latents, mean_score, score_pairs
from ropesp.plugins import fp8
from ropesp.runtime import pipeline
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

PAIRS = eval_pairs(int(os.environ.get("NPAIRS", "32")))


def main() -> None:
    for checkpoint in sys.argv[1:]:
        for precision in ("bf16", "fp8"):  # bf16 here: no FP8 GEMMs (the activations stay fp32)
            t0 = time.perf_counter()
            cfg = RunConfig.of(device="cpu", checkpoint=checkpoint, dtype="float32", precision=precision)
            with (
                torch.no_grad(),
                # the GPU-only checks of --precision fp8 refuse this CPU run; the weight-only config runs here
                mock.patch.object(pipeline, "check_precision", lambda *a, **k: None),
                mock.patch.object(fp8, "default_config", Float8WeightOnlyConfig),
            ):
                latents = generate_latents(build_session(cfg), PAIRS)
            score = mean_score(score_pairs(latents, PAIRS))
            print(f"{checkpoint} {precision}: {score:.3f} ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
