"""GPU probe for FP8: torchao GEMMs and 8-bit attention candidates at Wan-1.3B's block shapes.

    python scripts/fp8_probe.py --json OUT.json

Records, in one process on one GPU: which libraries import (torchao, fa3-fwd, sageattention); the
block's Linear shapes as bf16 `nn.Linear` against torchao's float8 Linear (rowwise scales), both under
torch.compile; self-attention at q 4680 tokens against 4680 / 18720 / 32760 keys, 12 heads x 128, for
cuDNN SDPA bf16 (the baseline), FlashAttention-3 bf16 and e4m3 (the kernel alone, and as `--attention fp8`
runs it: the chunk's new keys and values written into the e4m3 cache, q quantized per call, the kernel
over the window; and those quantizations alone) and SageAttention, each with its error against fp32 attention; and
whether an AOTInductor package of a float8 Linear builds and loads (--parts aoti).
"""

# ruff: noqa: B023  (each closure is timed within the loop iteration that defines it)
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F


def bench_ms(fn, iters: int = 10, reps: int = 5) -> float:
    """Milliseconds of one fn() on the GPU: `iters` calls captured in one CUDA graph (no launch or
    Python overhead, as in the runtime's chunk graphs), the median of `reps` replays over iters."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compilation, autotuning, lazy init outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / iters)
    return sorted(times)[len(times) // 2]


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    d = (out.float() - ref.float()).flatten()
    return {
        "rel_l2": float(d.norm() / ref.float().norm()),
        "max_abs": float(d.abs().max()),
        "finite": bool(torch.isfinite(out).all()),
    }


def try_import(name: str) -> dict:
    try:
        mod = __import__(name)
        return {"ok": True, "version": getattr(mod, "__version__", None)}
    except Exception as exc:  # any failure to load is the finding
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}


def gemms(rows: int) -> list[dict]:
    from torchao.quantization import quantize_

    from ropesp.plugins.fp8 import default_config

    out = []
    for k, n in ((1536, 1536), (1536, 8960), (8960, 1536)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        bf16 = torch.compile(lin)
        flops = 2 * rows * k * n
        with torch.inference_mode():
            t_bf16 = bench_ms(lambda: bf16(x))
            e_bf16 = errors(bf16(x), ref)
            q = torch.nn.Sequential(torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16))
            q[0].load_state_dict(lin.state_dict())
            q.requires_grad_(False)
            quantize_(q, default_config())
            fp8 = torch.compile(q)
            t_fp8 = bench_ms(lambda: fp8(x))
            e_fp8 = errors(fp8(x), ref)
        out.append(
            {
                "shape": [rows, k, n],
                "bf16_ms": t_bf16,
                "bf16_tflops": flops / t_bf16 / 1e9,
                "fp8_ms": t_fp8,
                "fp8_tflops": flops / t_fp8 / 1e9,
                "speedup": t_bf16 / t_fp8,
                "bf16_err_vs_fp32": e_bf16,
                "fp8_err_vs_fp32": e_fp8,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def attention(lq: int, lks: list[int], heads: int = 12, dim: int = 128) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ropesp.plugins import attention_8bit as a8
    from ropesp.plugins.e4m3_cache import calibrate, to_e4m3

    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    for lk in lks:
        q = torch.randn(1, lq, heads, dim, device="cuda", generator=g).to(torch.bfloat16)
        k = torch.randn(1, lk, heads, dim, device="cuda", generator=g).to(torch.bfloat16)
        v = torch.randn(1, lk, heads, dim, device="cuda", generator=g).to(torch.bfloat16)
        flops = 4 * lq * lk * heads * dim
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).transpose(1, 2)
        cands = {}

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

        cands["sdpa_cudnn_bf16"] = cudnn
        try:
            from fa3_fwd_interface import flash_attn_func

            cands["fa3_bf16"] = lambda: flash_attn_func(q, k, v)
            q8, dq = a8.quantize_per_head(q)
            k8, dk = a8.quantize_per_head(k)
            v8, dv = a8.quantize_per_head(v)
            cands["fa3_fp8_kernel_only"] = lambda: flash_attn_func(
                q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv
            )
            # what `--attention fp8` does per layer call: the chunk's new keys and values (lq tokens)
            # quantized into the e4m3 cache under the stream's scales, q quantized, the kernel over the
            # whole window (plugins/e4m3_cache.py)
            offset, k_scale, v_scale = calibrate(k, v)
            keys = a8.E4M3(to_e4m3(k, offset, k_scale), k_scale.reciprocal())
            values = a8.E4M3(to_e4m3(v, None, v_scale), v_scale.reciprocal())
            write = a8.compiled(to_e4m3, k)
            k_new, v_new = k[:, -lq:], v[:, -lq:]

            def cache_writes():
                return write(k_new, offset, k_scale), write(v_new, None, v_scale)

            cands["fa3_fp8_e4m3_cache"] = lambda: (cache_writes(), a8.fp8_attention(q, keys, values))[1]
            # q under the stream's fixed scales (the runtime's after its first chunk), no reduction
            from ropesp.plugins.e4m3_cache import QueryScale, query_scale

            scale = query_scale(q, None)
            fixed = QueryScale(scale, scale.reciprocal(), None, calibrate=False)
            keys_q = a8.E4M3(keys.data, keys.descale, fixed)
            cands["fa3_fp8_e4m3_cache_fixed_q"] = lambda: (
                cache_writes(),
                a8.fp8_attention(q, keys_q, values),
            )[1]
            cands["quant_q_fixed_scale"] = lambda: fixed.quantize(q)
            cands["quant_per_call"] = lambda: (
                cache_writes(),
                a8.compiled(a8.quantize_per_head, q)(q),
            )
            cands["quant_cache_writes"] = cache_writes
            cands["quant_q"] = lambda: a8.compiled(a8.quantize_per_head, q)(q)
            # the runtime compiles with dynamic shapes; a static reduction may be split across the GPU
            static_q = torch.compile(a8.quantize_per_head, dynamic=False, fullgraph=True)
            cands["quant_q_static_shapes"] = lambda: static_q(q)
        except Exception as exc:
            rows.append({"lk": lk, "fa3_error": f"{type(exc).__name__}: {exc}"[:1000]})
        try:
            import sageattention  # noqa: F401

            cands["sage_int8"] = lambda: a8.int8_attention(q, k, v)
        except Exception as exc:
            rows.append({"lk": lk, "sage_error": f"{type(exc).__name__}: {exc}"[:1000]})
        base_ms = None
        with torch.inference_mode():
            for name, fn in cands.items():
                row = {"lq": lq, "lk": lk, "candidate": name}
                try:
                    ms = bench_ms(fn)
                    out = fn()
                    row.update(ms=ms, tflops=flops / ms / 1e9)
                    if name == "sdpa_cudnn_bf16":
                        base_ms, base_out = ms, out
                    if not name.startswith("quant_"):
                        row["err_vs_fp32"] = errors(out, ref)
                        row["err_vs_cudnn_bf16"] = errors(out, base_out)
                    row["speedup_vs_cudnn"] = base_ms / ms
                except Exception as exc:
                    row["error"] = traceback.format_exc()[-1500:]
                    print(exc, file=sys.stderr)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del ref
        torch.cuda.empty_cache()
    return rows


def aoti_check() -> dict:
    """Build and load an AOTInductor package of one torchao float8 Linear (export -> package)."""
    from torchao.quantization import quantize_

    from ropesp.plugins.fp8 import (
        apply_fp8,  # noqa: F401  (the same config the pipeline uses)
        default_config,
    )

    t0 = time.perf_counter()
    try:
        m = torch.nn.Sequential(torch.nn.Linear(1536, 1536)).cuda().bfloat16().requires_grad_(False)
        x = torch.randn(256, 1536, device="cuda", dtype=torch.bfloat16)
        ref = m(x)
        quantize_(m, default_config())
        eager = m(x)
        with tempfile.TemporaryDirectory() as tmp:
            ep = torch.export.export(m, (x,))
            path = torch._inductor.aoti_compile_and_package(ep, package_path=f"{tmp}/m.pt2")
            loaded = torch._inductor.aoti_load_package(path)
            out = loaded(x)
        return {
            "ok": True,
            "seconds": time.perf_counter() - t0,
            "vs_eager_fp8": errors(out, eager),
            "vs_bf16": errors(out, ref),
        }
    except Exception:
        return {"ok": False, "seconds": time.perf_counter() - t0, "error": traceback.format_exc()[-3000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--parts", default="gemm,attention", help="comma-separated: gemm, attention, aoti")
    args = ap.parse_args()
    res: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "card": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__,
        "imports": {n: try_import(n) for n in ("torchao", "fa3_fwd_interface", "sageattention", "triton")},
    }
    try:
        res["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        pass
    print(json.dumps(res), flush=True)
    parts = args.parts.split(",")
    for key, fn in (
        ("gemm_4680", lambda: gemms(4680)),
        ("attention", lambda: attention(4680, [4680, 18720, 32760])),
    ):
        if key.split("_")[0] not in parts:
            continue
        try:
            res[key] = fn()
        except Exception:
            res[key] = {"error": traceback.format_exc()[-3000:]}
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if "aoti" in parts:
        res["aoti_fp8_linear"] = aoti_check()
        print(json.dumps(res["aoti_fp8_linear"]), flush=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
