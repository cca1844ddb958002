"""TensorRT: without it `ropesp build --backend tensorrt` says so (exit 2, no traceback); with it
(marked, skipped here) the engines run and equal eager."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"TensorRT is not installed ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "TensorRT engines need a CUDA GPU"
    return None


MISSING = _tensorrt_missing()
needs_tensorrt = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.mark.skipif(MISSING is None, reason="TensorRT is installed here")
def test_build_tensorrt_without_tensorrt_is_a_clear_error(tmp_path):
    out = tmp_path / "trt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ropesp.cli",
            "build",
            "--preset",
            "tiny",
            "--backend",
            "tensorrt",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "TensorRT is not installed here" in proc.stderr and "--backend aoti" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # refused before any work


def test_bfloat16_onnx_for_tensorrt_is_valid_and_ort_refuses_it(tmp_path, capsys):
    """TensorRT's input: a bf16 ONNX build (strongly typed network: precision from the graph) passes
    onnx.checker (build runs it) with the RopeSP node on bf16 tensors; ONNX Runtime refuses it clearly."""
    import onnx

    from ropesp.cli import main
    from ropesp.export.build import BuildConfig, build

    out = build(BuildConfig.of(str(tmp_path / "bf16"), "onnx", preset="tiny", latent_height=10, latent_width=14,
                            max_frames=3, dtype="bfloat16"))  # fmt: skip
    pre = onnx.load(out / "rank0" / "pre.onnx")
    bf16 = onnx.TensorProto.BFLOAT16
    assert {i.name: i.type.tensor_type.elem_type for i in pre.graph.input}["self_attn.q.weight"] == bf16
    assert [n.op_type for n in pre.graph.node].count("RopeSP") == 2
    assert main(["generate", "--engines", str(out), "--output", str(tmp_path / "v.mp4")]) == 2
    assert "--backend ort runs float32 graphs on the CPU" in capsys.readouterr().err


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensorrt_engines_equal_eager(tmp_path, prompt, dtype):
    from ropesp.export.build import BuildConfig, build
    from ropesp.manifest import Manifest
    from ropesp.runtime.pipeline import build_session
    from ropesp.settings import RunConfig

    out = build(BuildConfig.of(str(tmp_path / "trt"), "tensorrt", preset="tiny", latent_height=10, latent_width=14,
                            max_frames=6, dtype=dtype))  # fmt: skip
    manifest = Manifest.load(out)
    assert manifest.versions["tensorrt"] and manifest.gpu_arch.startswith("sm_")
    common = dict(
        preset="tiny", latent_height=10, latent_width=14, latent_frames=6, device="cuda", dtype=dtype
    )
    results = {}
    for name, extra in {"eager": {}, "trt": dict(engines=str(out), cuda_graphs=False),
                        "graphs": dict(engines=str(out))}.items():  # fmt: skip
        session = build_session(RunConfig.of(**common, **extra))
        session.reset(prompt, seed=3)
        results[name] = session.generate()
    rel = (results["trt"] - results["eager"]).norm() / results["eager"].norm()
    assert rel < (2e-3 if dtype == "float32" else 2e-2), rel  # TensorRT may use TF32 for fp32 GEMMs
    torch.testing.assert_close(results["graphs"], results["trt"], rtol=0, atol=1e-5)
