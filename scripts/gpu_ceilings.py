"""The two ceilings a roofline needs, measured on this GPU: device-to-device copy bandwidth (bytes read +
written) and a large bf16 matrix product's rate (cuBLAS).

    python scripts/gpu_ceilings.py --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch
from cuda_timing import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    src = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)  # 2 GiB, far beyond L2
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm_ms = median_ms(lambda: a @ b)
    out = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "copy_tb_s": 2 * src.nbytes / copy_ms / 1e9,
        "bf16_gemm_tflops": 2 * n**3 / gemm_ms / 1e9,
    }
    print(json.dumps(out), flush=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
