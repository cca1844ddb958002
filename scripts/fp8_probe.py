"""GPU probe for FP8: torchao GEMMs and 8-bit attention candidates at Wan-1.3B's block shapes.

    python scripts/fp8_probe.py --json OUT.json

Records, in one process on one GPU: which libraries import (torchao, fa3-fwd, sageattention); the
block's Linear shapes as bf16 `nn.Linear` against torchao's float8 Linear (rowwise and tensorwise
scales), both under torch.compile, and the bare `torch._scaled_mm` kernels; a block's two GEMM stages with
the modulated LayerNorm that feeds them, compiled, in bf16 and float8; self-attention at q 4680 tokens against 4680 / 18720 / 32760 keys, 12 heads x 128, for
cuDNN SDPA bf16 (the baseline), FlashAttention-3 bf16 and e4m3 (the kernel alone, and as `--attention fp8`
runs it: the chunk's new keys and values written into the e4m3 cache, q quantized per call, the kernel
over the window; and those quantizations alone) and SageAttention, each with its error against fp32 attention; and
whether an AOTInductor package of a float8 Linear builds and loads (--parts aoti).
"""

# ruff: noqa: B023  (each closure is timed within the loop iteration that defines it)
from __future__ import annotations

import argparse
import functools
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


def _e4m3(x: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x in e4m3 with its fp32 scale: one per row of `dim` (keepdim), or one for the tensor (dim None)."""
    amax = (x.abs().amax(dim, keepdim=True) if dim is not None else x.abs().amax()).float()
    scale = amax.clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class _Modulated(torch.nn.Module):
    """A block's GEMM stage with its producer, from model/wan.py's modules: the modulated LayerNorm
    (norm1 / norm2), then either the self-attention's q, k, v projections or the FFN."""

    def __init__(self, dim: int, ffn_dim: int, part: str) -> None:
        super().__init__()
        from ropesp.model.wan import FeedForward, Linear, ModulatedLayerNorm

        self.part = part
        self.norm = ModulatedLayerNorm(1e-6)
        if part == "qkv":
            self.q, self.k, self.v = (Linear(dim, dim) for _ in range(3))
        else:
            self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x, shift, scale, frame_of_token):
        h = self.norm(x, shift, scale, frame_of_token)
        if self.part == "qkv":
            return self.q(h), self.k(h), self.v(h)
        return self.ffn(h)

    def to_runtime_fp8(self) -> None:
        """After torchao's quantize_: the layers apply_fp8 swaps in (plugins/fp8_layers.py)."""
        from ropesp.plugins import fp8_layers as layers

        layers.swap_class(self.norm, layers.E4M3ModulatedLayerNorm)
        if self.part == "qkv":
            for name in "qkv":
                setattr(self, name, layers.E4M3Linear.from_quantized(getattr(self, name)))
        else:
            layers.FP8FeedForward.from_quantized(self.ffn)


def gemms(rows: int) -> list[dict]:
    """Each block GEMM shape: bf16 nn.Linear, torchao float8 with rowwise and with tensorwise scales
    (the activation's quantization included), and the bare `torch._scaled_mm` kernels on inputs
    quantized beforehand; then the two GEMM stages of a block with their producer (the modulated
    LayerNorm), compiled as the runtime compiles them, in bf16 and in both float8 granularities."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    from ropesp.plugins import e4m3_rows as rows_ops

    def config(granularity):
        return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)

    configs = {"fp8_rowwise": config(PerRow()), "fp8_tensorwise": config(PerTensor())}
    g = torch.Generator("cuda").manual_seed(0)
    out = []

    def record(row: dict) -> None:
        out.append(row)
        print(json.dumps(row), flush=True)

    for k, n in ((1536, 1536), (1536, 8960), (8960, 1536), (1536, 4608)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
        lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
        ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        flops = 2 * rows * k * n
        with torch.inference_mode():
            cands = {"bf16": torch.compile(lin)}
            for name, cfg in configs.items():
                q = torch.nn.Sequential(torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16))
                q[0].load_state_dict(lin.state_dict())
                q.requires_grad_(False)
                quantize_(q, cfg)
                cands[name] = torch.compile(q)
            xr, sxr = _e4m3(x, -1)
            wr, swr = _e4m3(lin.weight, -1)
            xt, sxt = _e4m3(x, None)
            wt, swt = _e4m3(lin.weight, None)
            for name, (a, sa, b, sb) in {
                "kernel_rowwise": (xr, sxr, wr, swr),
                "kernel_tensorwise": (xt, sxt, wt, swt),
            }.items():
                for fast in (True, False):
                    cands[f"{name}{'' if fast else '_no_fast_accum'}"] = (
                        lambda a=a, sa=sa, b=b, sb=sb, fast=fast, bias=lin.bias: torch._scaled_mm(
                            a,
                            b.t(),
                            scale_a=sa,
                            scale_b=sb.t(),
                            bias=bias,
                            out_dtype=torch.bfloat16,
                            use_fast_accum=fast,
                        )
                    )
            base = None
            for name, fn in cands.items():
                row = {"shape": [rows, k, n], "variant": name}
                try:
                    ms = bench_ms(lambda: fn(x) if not name.startswith("kernel") else fn())
                    res = fn(x) if not name.startswith("kernel") else fn()
                    base = ms if name == "bf16" else base
                    row.update(
                        ms=ms,
                        tflops=flops / ms / 1e9,
                        speedup_vs_bf16=base / ms,
                        err_vs_fp32=errors(res, ref),
                    )
                except Exception:
                    row["error"] = traceback.format_exc()[-1500:]
                record(row)
        del x, lin, ref, cands
        torch.cuda.empty_cache()

    dim, ffn_dim, frames = 1536, 8960, 3
    x = torch.randn(1, rows, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    shift = (torch.randn(1, frames, dim, device="cuda", generator=g) * 0.1).bfloat16()
    scale = (torch.randn(1, frames, dim, device="cuda", generator=g) * 0.1).bfloat16()
    frame_of_token = torch.arange(rows, device="cuda") * frames // rows
    args = (x, shift, scale, frame_of_token)
    for part, flops in (("qkv", 2 * rows * dim * dim * 3), ("ffn", 4 * rows * dim * ffn_dim)):
        torch.manual_seed(0)
        bf16 = _Modulated(dim, ffn_dim, part).cuda().bfloat16().requires_grad_(False)
        with torch.inference_mode():
            ref = bf16.float()(x.float(), shift.float(), scale.float(), frame_of_token)
            bf16 = bf16.bfloat16()
            cands = {"bf16": bf16}
            # fp8_rowwise: the runtime's layers (the fused row kernels); *_torchao: torchao's Linear,
            # its activation quantization generated by Inductor with the norm (and the GELU)
            for variant, cfg in (("fp8_rowwise", "fp8_rowwise"), ("fp8_rowwise_torchao", "fp8_rowwise"),
                                 ("fp8_tensorwise_torchao", "fp8_tensorwise")):  # fmt: skip
                m = _Modulated(dim, ffn_dim, part).cuda().bfloat16().requires_grad_(False)
                m.load_state_dict(bf16.state_dict())
                quantize_(m, configs[cfg])
                if variant == "fp8_rowwise":
                    m.to_runtime_fp8()
                elif part == "ffn":  # Linear, GELU, Linear: Inductor fuses the GELU and the quantization
                    m.ffn.forward = functools.partial(torch.nn.Sequential.forward, m.ffn)
                cands[variant] = m
            base = None
            for name, m in cands.items():
                fn = torch.compile(m, dynamic=False)
                row = {"stage": f"modulated LayerNorm -> {part}", "rows": rows, "variant": name}
                try:
                    ms = bench_ms(lambda: fn(*args))
                    res = fn(*args)
                    base = ms if name == "bf16" else base
                    err = errors(torch.cat([r.flatten() for r in res]) if part == "qkv" else res,
                                 torch.cat([r.flatten() for r in ref]) if part == "qkv" else ref)  # fmt: skip
                    row.update(ms=ms, tflops=flops / ms / 1e9, speedup_vs_bf16=base / ms, err_vs_fp32=err)
                except Exception:
                    row["error"] = traceback.format_exc()[-1500:]
                record(row)
    # the row kernels alone against Inductor's code for the same math (each reference compiled)
    h = torch.randn(rows, ffn_dim, device="cuda", dtype=torch.bfloat16, generator=g) * 3
    x2 = x.flatten(0, 1)
    w, b = (1 + scale[0, 0]), shift[0, 0]
    cases = {
        "gelu + rowwise e4m3": (rows_ops.gelu_quant_e4m3, rows_ops.gelu_quant_ref, (h,), rows_ops.GELU, {}),
        "rowwise e4m3": (rows_ops.quant_e4m3, rows_ops.quant_ref, (x2,), rows_ops.QUANT, {}),
        "affine LayerNorm + rowwise e4m3": (
            rows_ops.norm_quant_e4m3, rows_ops.norm_quant_ref, (x2, w, b, 1e-6), rows_ops.NORM,
            {"mul": w, "add": b, "eps": 1e-6},
        ),
        "modulated LayerNorm + rowwise e4m3": (
            rows_ops.modulated_norm_quant_e4m3, rows_ops.modulated_norm_quant_ref,
            (x, shift, scale, frame_of_token, 1e-6), rows_ops.NORM,
            {"mul": scale, "add": shift, "frame_of_token": frame_of_token, "eps": 1e-6},
        ),
    }  # fmt: skip
    for stage, (op, ref_fn, op_args, mode, launch_kw) in cases.items():
        src = op_args[0]
        ref8, ref_scale = ref_fn(*op_args)
        moved = (
            src.numel() * (src.element_size() + 1) + src.numel() // src.shape[-1] * 4
        )  # bytes read, written
        kernels = [("kernel", op), ("inductor", torch.compile(ref_fn, dynamic=False))]
        kernels += [(f"kernel_{w_}_warps", functools.partial(rows_ops.launch, mode=mode, num_warps=w_, **launch_kw))
                    for w_ in (2, 4, 8, 16)]  # fmt: skip
        for name, fn in kernels:
            call = (lambda fn=fn: fn(src)) if name.startswith("kernel_") else (lambda fn=fn: fn(*op_args))
            try:
                with torch.inference_mode():
                    ms = bench_ms(call)
                    v8, v_scale = call()
                back, ref = v8.float() * v_scale, ref8.float() * ref_scale
                record({"stage": stage, "rows": src.shape[0], "cols": src.shape[1], "variant": name, "ms": ms,
                        "gb_per_s": moved / ms / 1e6,
                        "scale_max_rel": float(((v_scale - ref_scale) / ref_scale).abs().max()),
                        "codes_differing": int((v8.view(torch.uint8) != ref8.view(torch.uint8)).sum()),
                        "err_vs_reference": errors(back, ref)})  # fmt: skip
            except Exception:
                record({"stage": stage, "variant": name, "error": traceback.format_exc()[-1500:]})
    return out


def attention(lq: int, lks: list[int], heads: int = 12, dim: int = 128) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ropesp.plugins import attention_8bit as a8
    from ropesp.plugins import e4m3
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
            q8, dq = e4m3.quantize_per_head(q)
            k8, dk = e4m3.quantize_per_head(k)
            v8, dv = e4m3.quantize_per_head(v)
            cands["fa3_fp8_kernel_only"] = lambda: flash_attn_func(
                q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv
            )
            # what `--attention fp8` does per layer call: the chunk's new keys and values (lq tokens)
            # quantized into the e4m3 cache under the stream's scales, q quantized, the kernel over the
            # whole window (plugins/e4m3_cache.py)
            offset, k_scale, v_scale = calibrate(k, v)
            keys = e4m3.E4M3(to_e4m3(k, offset, k_scale), k_scale.reciprocal())
            values = e4m3.E4M3(to_e4m3(v, None, v_scale), v_scale.reciprocal())
            write = e4m3.compiled(to_e4m3, k)
            k_new, v_new = k[:, -lq:], v[:, -lq:]

            def cache_writes():
                return write(k_new, offset, k_scale), write(v_new, None, v_scale)

            cands["fa3_fp8_e4m3_cache"] = lambda: (cache_writes(), a8.fp8_attention(q, keys, values))[1]
            cands["quant_per_call"] = lambda: (
                cache_writes(),
                e4m3.compiled(e4m3.quantize_per_head, q)(q),
            )
            cands["quant_cache_writes"] = cache_writes
            cands["quant_q"] = lambda: e4m3.compiled(e4m3.quantize_per_head, q)(q)
            # for comparison: the same reduction compiled with dynamic shapes
            dynamic_q = torch.compile(e4m3.quantize_per_head, dynamic=True, fullgraph=True)
            cands["quant_q_dynamic_shapes"] = lambda: dynamic_q(q)
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
