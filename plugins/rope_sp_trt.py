"""`ropesp::RopeSP` as a TensorRT Quickly-Deployable Plugin (`tensorrt.plugin`, TensorRT >= 10.9).

The ONNX node of plugins/rope_sp_onnx.py (domain `ropesp`, op_type `RopeSP`, attribute
`plugin_namespace="ropesp"`) resolves to the plugin registered here as "ropesp::RopeSP"; its node
attributes become the plugin fields (INT -> int, FLOAT -> float). Two implementations:

- `aot_impl`: `_rope_sp_kernel` (plugins/rope_sp.py) compiled by Triton to PTX at engine build time and
  embedded in the engine, so running the engine needs no Python (node attribute `aot=1`, the default).
  Kernel ABI as TensorRT launches it: (X, START, n_tokens, n_heads, Y); grid (cdiv(L, BLOCK_L), B);
  the grid attributes, first_token, theta and the split are compile-time constants.
- `impl`: JIT fallback that calls torch.ops.ropesp.rope_sp on TensorRT's stream (`aot=0`); the engine
  then needs this module imported and `register_trt_plugin()` called before deserialization.

Nothing here runs where TensorRT is missing: `register_trt_plugin()` raises BackendUnavailableError.
No `from __future__ import annotations`: tensorrt.plugin inspects the annotations as classes.
"""

from typing import NamedTuple

import torch

from ropesp.errors import BackendUnavailableError
from ropesp.plugins.rope_sp import BLOCK_L, NUM_WARPS, kernel_constexprs

PLUGIN = "ropesp::RopeSP"
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_registered = False


class CompiledKernel(NamedTuple):
    """One AOT compilation of `_rope_sp_kernel`: what a TensorRT AOT plugin returns, plus launch sizes."""

    name: str
    ptx: str
    num_warps: int
    shared_mem: int


def compile_kernel(
    dtype: torch.dtype,
    frames: int,
    rows: int,
    cols: int,
    first_token: int,
    theta: float,
    head_dim: int,
    arch: int = 90,
    ptx_version: int | None = None,
) -> CompiledKernel:
    """Compile `_rope_sp_kernel` to PTX for sm_<arch> (90: H100/H200) without a GPU; needs triton only.

    ptx_version caps the PTX ISA at what the engine's driver accepts. Rejects kernels whose launch needs
    more than TensorRT provides (scratch buffers, clusters, cooperative or PDL launch).
    """
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise BackendUnavailableError(
            "compiling the RopeSP kernel ahead of time needs triton (pip install triton)"
        ) from e
    from ropesp.plugins.rope_sp import _rope_sp_kernel

    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"RopeSP AOT kernel: dtype {dtype} not in {tuple(_TRITON_DTYPES)}")
    ty = _TRITON_DTYPES[dtype]
    signature = {"X": f"*{ty}", "START": "*i32", "n_tokens": "i32", "n_heads": "i32", "Y": f"*{ty}"}
    constexprs = kernel_constexprs(frames, rows, cols, first_token, theta, head_dim)
    options = {"num_warps": NUM_WARPS} | ({"ptx_version": ptx_version} if ptx_version else {})
    src = triton.compiler.ASTSource(fn=_rope_sp_kernel, signature=signature, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    meta = k.metadata
    unsupported = {
        "global_scratch_size": getattr(meta, "global_scratch_size", 0),
        "profile_scratch_size": getattr(meta, "profile_scratch_size", 0),
        "num_ctas": getattr(meta, "num_ctas", 1) - 1,
        "launch_cooperative_grid": getattr(meta, "launch_cooperative_grid", False),
        "launch_pdl": getattr(meta, "launch_pdl", False),
    }
    if any(unsupported.values()):
        raise RuntimeError(f"RopeSP kernel needs launch features TensorRT AOT plugins lack: {unsupported}")
    return CompiledKernel(meta.name, k.asm["ptx"], meta.num_warps, meta.shared)


def register_trt_plugin() -> None:
    """Register "ropesp::RopeSP" (descriptor, type combinations, AOT and JIT implementations); idempotent.

    Call before parsing an ONNX model with RopeSP nodes and before deserializing a JIT-plugin engine.
    """
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except (ImportError, OSError) as e:  # OSError: the frontend is there but libnvinfer is not
        raise BackendUnavailableError(
            f"TensorRT is not usable here ({type(e).__name__}: {e}). The tensorrt backend needs a full "
            "TensorRT >= 10.9 install (python bindings + libnvinfer); build with --backend aoti or onnx instead."
        ) from e
    if not hasattr(trt, "QuickPluginCreationRequest"):
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} has no AOT Python plugins; RopeSP needs TensorRT >= 10.9"
        )
    trt_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}

    @trtp.register(PLUGIN)
    def _desc(
        x: trtp.TensorDesc,
        start_frame: trtp.TensorDesc,
        frames: int,
        rows: int,
        cols: int,
        first_token: int,
        theta: float,
        t_dim: int,
        h_dim: int,
        w_dim: int,
    ) -> trtp.TensorDesc:
        return x.like()  # y: [B, L, H, D], x's dtype

    @trtp.autotune(PLUGIN)
    def _autotune(x: trtp.TensorDesc, start_frame: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]):
        # positions (x, start_frame, y); '|' alternatives pair up: x and y always share a dtype
        return [trtp.AutoTuneCombination("FP32|FP16|BF16, INT32, FP32|FP16|BF16", "LINEAR")]

    @trtp.aot_impl(PLUGIN)
    def _aot(
        x: trtp.TensorDesc,
        start_frame: trtp.TensorDesc,
        frames: int,
        rows: int,
        cols: int,
        first_token: int,
        theta: float,
        t_dim: int,
        h_dim: int,
        w_dim: int,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        head_dim = t_dim + h_dim + w_dim
        major, minor = torch.cuda.get_device_capability()  # the GPU the engine is built on
        arch = 10 * major + minor
        k = compile_kernel(trt_dtypes[x.dtype], frames, rows, cols, first_token, theta, head_dim, arch)
        batch, length, heads = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(length, BLOCK_L)
        launch.grid_y = batch
        launch.block_x = k.num_warps * 32
        launch.shared_mem = k.shared_mem
        # the kernel's int32 scalars n_tokens, n_heads, resolved from the shapes at run time
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(length), trtp.SymInt32(heads)])
        return k.name, k.ptx, launch, extra_args

    @trtp.impl(PLUGIN)
    def _impl(
        x: trtp.Tensor,
        start_frame: trtp.Tensor,
        frames: int,
        rows: int,
        cols: int,
        first_token: int,
        theta: float,
        outputs: tuple[trtp.Tensor],
        stream: int,
    ) -> None:
        import ropesp.plugins.rope_sp  # noqa: F401  (registers torch.ops.ropesp.rope_sp)

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            xt = torch.as_tensor(x, device="cuda")
            sf = torch.as_tensor(start_frame, device="cuda")
            y = torch.as_tensor(outputs[0], device="cuda")
            y.copy_(torch.ops.ropesp.rope_sp(xt, sf, frames, rows, cols, first_token, theta))

    _registered = True
