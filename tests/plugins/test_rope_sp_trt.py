"""The TensorRT plugin `ropesp::RopeSP`: its error path here, its AOT kernel (Triton only), and the real
engine where TensorRT exists."""

from __future__ import annotations

import ctypes
import re

import pytest
import torch

from ropesp.errors import BackendUnavailableError
from ropesp.plugins.rope_sp import BLOCK_L, rope_sp_ref
from ropesp.plugins.rope_sp_trt import compile_kernel, register_trt_plugin


def _missing(module: str) -> str | None:
    try:
        __import__(module)
    except (ImportError, OSError) as e:
        return f"{module} is not importable here ({type(e).__name__}: {e})"
    return None


NO_TENSORRT = _missing("tensorrt")
NO_TRITON = _missing("triton")
needs_tensorrt = pytest.mark.skipif(NO_TENSORRT is not None, reason=NO_TENSORRT or "")
needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=NO_TRITON or "")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ATTRS = dict(frames=2, rows=3, cols=7, first_token=11, theta=10000.0)


def test_register_trt_plugin_without_tensorrt_raises_clear_error():
    if NO_TENSORRT is None:
        pytest.skip("TensorRT is installed here, so the error path cannot be exercised")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not usable here") as info:
        register_trt_plugin()
    assert "--backend aoti" in str(info.value)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_sp_aot_kernel_compiles_to_ptx(dtype):
    k = compile_kernel(dtype, head_dim=128, **ATTRS)
    assert re.search(rf"\.entry\s+{k.name}\s*\(", k.ptx), "PTX must define the entry TensorRT launches"
    assert k.num_warps * 32 <= 1024 and k.shared_mem < 48 * 1024


def _entry_params(ptx: str, name: str) -> int:
    signature = re.search(rf"\.entry\s+{name}\s*\((.*?)\)", ptx, re.S).group(1)
    return signature.count(".param")


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_sp_aot_ptx_launched_like_tensorrt(dtype):
    """Load the AOT PTX with the CUDA driver and launch it with TensorRT's ABI: (inputs, int32 extras,
    outputs), hidden trailing parameters null, grid (cdiv(L, BLOCK_L), B)."""
    driver = pytest.importorskip("cuda.bindings.driver", reason="needs cuda-bindings to load PTX")
    major, minor = torch.cuda.get_device_capability()
    k = compile_kernel(dtype, head_dim=64, arch=10 * major + minor, **ATTRS)
    b, length, heads = 2, 37, 5
    x = torch.randn(b, length, heads, 64, device="cuda").to(dtype)
    start = torch.tensor([4], dtype=torch.int32, device="cuda")
    y = torch.full_like(x, float("nan"))
    err, module = driver.cuModuleLoadData(k.ptx.encode() + b"\0")
    assert err == driver.CUresult.CUDA_SUCCESS, err
    err, fn = driver.cuModuleGetFunction(module, k.name.encode())
    assert err == driver.CUresult.CUDA_SUCCESS, err
    hidden = _entry_params(k.ptx, k.name) - 5
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    args = ((x.data_ptr(), start.data_ptr(), length, heads, y.data_ptr(), *[0] * hidden),
            (ptr, ptr, i32, i32, ptr, *[ptr] * hidden))  # fmt: skip
    grid = (-(-length // BLOCK_L), b, 1)
    stream = torch.cuda.current_stream().cuda_stream
    (err,) = driver.cuLaunchKernel(fn, *grid, k.num_warps * 32, 1, 1, k.shared_mem, stream, args, 0)
    assert err == driver.CUresult.CUDA_SUCCESS, err
    torch.cuda.synchronize()
    ref = rope_sp_ref(x.cpu(), start.cpu(), **ATTRS)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-5, rtol=2**-7)
    torch.testing.assert_close(y.cpu(), ref, **tol)
    driver.cuModuleUnload(module)


@pytest.mark.tensorrt
@needs_tensorrt
def test_register_trt_plugin_is_idempotent():
    import tensorrt as trt

    register_trt_plugin()
    register_trt_plugin()
    assert trt.get_plugin_registry().get_creator("RopeSP", "1", "ropesp") is not None


class _Rope(torch.nn.Module):
    def forward(self, x: torch.Tensor, start_frame: torch.Tensor) -> torch.Tensor:
        return torch.ops.ropesp.rope_sp(x, start_frame, *ATTRS.values())


@pytest.mark.tensorrt
@pytest.mark.slow
@needs_tensorrt
@needs_cuda
@pytest.mark.parametrize("aot", [True, False])
def test_rope_sp_trt_engine_matches_op(tmp_path, aot):
    import tensorrt as trt

    from ropesp.plugins.rope_sp_onnx import translation_table

    register_trt_plugin()
    x = torch.randn(1, 37, 5, 64, device="cuda", dtype=torch.bfloat16)
    start = torch.tensor([4], dtype=torch.int32, device="cuda")
    path = tmp_path / "rope.onnx"
    prog = torch.onnx.export(
        _Rope(), (x, start), dynamo=True, input_names=["x", "start_frame"], output_names=["y"],
        custom_translation_table=translation_table(aot=aot),
    )  # fmt: skip
    prog.save(str(path))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(path)), [parser.get_error(i) for i in range(parser.num_errors)]
    engine = trt.Runtime(logger).deserialize_cuda_engine(
        builder.build_serialized_network(network, builder.create_builder_config())
    )
    context = engine.create_execution_context()
    y = torch.empty_like(x)
    for name, tensor in (("x", x), ("start_frame", start), ("y", y)):
        context.set_tensor_address(name, tensor.data_ptr())
    for value in (4, 300):  # start_frame is a runtime input: same engine, new chunk
        start.fill_(value)
        assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        expected = torch.ops.ropesp.rope_sp(x, start, *ATTRS.values())
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=2**-7)
