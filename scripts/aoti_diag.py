"""Which AOTInductor CUDA packages load and run on this machine: small variants, each in its own process
(a segfault ends only that variant), then a native backtrace of the first failing one (gdb, if present).

    python scripts/aoti_diag.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

VARIANTS = ("constants", "inputs_only", "inputs_only_idx0_single", "inputs_plus_constant", "rope_op")


class WithConstants(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return torch.nn.functional.gelu(self.lin(x))


class InputsOnly(torch.nn.Module):
    def forward(self, x, w, b):
        return torch.nn.functional.gelu(x @ w.t() + b)


class InputsPlusConstant(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("one", torch.ones(1))

    def forward(self, x, w, b):
        return torch.nn.functional.gelu(x @ w.t() + b) * self.one


class RopeOp(torch.nn.Module):
    def forward(self, x, start_frame):
        from ropesp.plugins.rope_sp import make_rope_op

        return make_rope_op(start_frame, 3, 4, 5, 0, 10000.0)(x) * 2


def run_variant(name: str, out: Path) -> None:
    import ropesp.plugins.rope_sp  # noqa: F401

    dev = torch.device(os.environ.get("DIAG_DEVICE", "cuda"))
    x = torch.randn(8, 64, device=dev)
    w, b = torch.randn(64, 64, device=dev), torch.randn(64, device=dev)
    if name == "constants":
        mod, args = WithConstants().to(dev), (x,)
    elif name == "rope_op":
        mod = RopeOp()
        args = (torch.randn(1, 60, 2, 16, device=dev), torch.zeros(1, dtype=torch.int32, device=dev))
    elif name == "inputs_plus_constant":
        mod, args = InputsPlusConstant().to(dev), (x, w, b)
    else:
        mod, args = InputsOnly(), (x, w, b)
    ep = torch.export.export(mod, args, strict=False)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(out / f"{name}.pt2"))
    print(f"[{name}] compiled", flush=True)
    kwargs = dict(run_single_threaded=True, device_index=0) if name.endswith("idx0_single") else {}
    fn = torch._inductor.aoti_load_package(path, **kwargs)
    print(f"[{name}] loaded", flush=True)
    got = fn(*args)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ref = mod(*args)
    print(f"[{name}] ran, max diff {(got - ref).abs().max().item():.2e}", flush=True)


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if len(sys.argv) > 2:
        run_variant(sys.argv[2], out)
        return
    procs = {
        v: subprocess.Popen([sys.executable, __file__, str(out), v], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
        for v in VARIANTS
    }  # fmt: skip
    results = {}
    for v, p in procs.items():
        log = p.communicate()[0]
        results[v] = {"rc": p.returncode, "log_tail": log[-1500:]}
        print(f"== {v}: rc={p.returncode}\n{log[-600:]}", flush=True)
    failing = [v for v, r in results.items() if r["rc"] != 0]
    gdb = shutil.which("gdb") or shutil.which("cuda-gdb")
    if failing and gdb:
        bt = subprocess.run(
            [gdb, "-batch", "-ex", "run", "-ex", "bt 40", "--args", sys.executable, __file__, str(out), failing[0]],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        frames = [
            line[:240] for line in bt.stdout.splitlines() if line.startswith(("#", "Thread", "Program"))
        ]
        results["gdb_backtrace"] = frames[:60]  # the top frames say where it faults
        print("\n".join(frames[:30]))
    (out / "aoti_diag.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
