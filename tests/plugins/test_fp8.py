"""FP8 GEMMs (plugins/fp8.py): which Linears are quantized at load, and where fp8 is refused.

The GPU kernels (e4m3 `_scaled_mm`) need compute capability >= 8.9; here torchao's weight-only float8
config, which runs on the CPU, stands in for the dynamic-activation one to check the selection, the
e4m3 weights and the forward of the quantized tiny model. The GPU path is measured by
scripts/fp8_probe.py and scripts/fp8_quality.py.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from ropesp.errors import BackendUnavailableError, ConfigError
from ropesp.model.kv_cache import CacheSlots, KVCache
from ropesp.model.rope import RopeGrid
from ropesp.model.wan import FeedForward, LayerNorm, ModulatedLayerNorm, timestep_sinusoid
from ropesp.plugins import fp8
from ropesp.plugins.fp8_layers import E4M3LayerNorm, E4M3Linear, E4M3ModulatedLayerNorm, FP8FeedForward
from ropesp.plugins.rope_sp import rope_for_rank
from ropesp.runtime.pipeline import resolve
from ropesp.runtime.runners import SingleDeviceRunner
from ropesp.settings import RunConfig

BLOCK_LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"]
BLOCK_LINEARS += ["cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def test_selection_is_the_blocks_attention_and_ffn_linears(tiny_model, tiny_cfg):
    names = fp8.fp8_linear_names(tiny_model)
    expected = [f"blocks.{i}.{n}" for i in range(tiny_cfg.num_layers) for n in BLOCK_LINEARS]
    assert names == expected
    every_linear = {n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = every_linear - set(names)
    # embeddings and the head stay in the model dtype
    assert kept == {
        "text_embedding.0",
        "text_embedding.2",
        "time_embedding.0",
        "time_embedding.2",
        "time_projection.1",
        "head.head",
    }


def test_fp8_ffn_selects_the_ffn_linears_alone(tiny_model, tiny_cfg):
    names = fp8.fp8_linear_names(tiny_model, "fp8-ffn")
    assert names == [f"blocks.{i}.ffn.{j}" for i in range(tiny_cfg.num_layers) for j in (0, 2)]
    lin = torch.nn.Linear(4, 4)
    assert not fp8.is_fp8_linear(lin, "blocks.0.self_attn.q", "fp8-ffn")
    assert fp8.PRECISIONS == ("bf16", "fp8", "fp8-ffn")


def test_apply_fp8_ffn_leaves_the_attention_projections_bf16(tiny_model):
    tq = pytest.importorskip("torchao.quantization")
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    names = fp8.apply_fp8(model, tq.Float8WeightOnlyConfig(), precision="fp8-ffn")
    assert names == fp8.fp8_linear_names(tiny_model, "fp8-ffn")
    assert {n for n, m in model.named_modules() if isinstance(m, E4M3Linear)} == set(names)
    # the FFN's norm quantizes its output; norm1 and norm3 feed bf16 projections and stay as they are
    for block in model.blocks:
        assert type(block.norm2) is E4M3ModulatedLayerNorm
        assert type(block.norm1) is ModulatedLayerNorm and type(block.norm3) is LayerNorm
        assert all(isinstance(block.self_attn.get_submodule(p), torch.nn.Linear) for p in "qkvo")


def test_selection_rejects_lookalikes():
    lin = torch.nn.Linear(4, 4)
    assert fp8.is_fp8_linear(lin, "blocks.0.self_attn.q")
    assert fp8.is_fp8_linear(lin, "blocks.29.ffn.2")
    assert not fp8.is_fp8_linear(lin, "blocks.0.self_attn.norm_q")
    assert not fp8.is_fp8_linear(lin, "blocks.0.ffn.1")  # the GELU slot
    assert not fp8.is_fp8_linear(lin, "head.head")
    assert not fp8.is_fp8_linear(torch.nn.LayerNorm(4), "blocks.0.self_attn.q")


def _forward(model, cfg, x, prompt):
    """One chunk forward of the tiny model on the CPU (single rank, empty cache): flow [B, F, C, H, W]."""
    from ropesp.config import CacheConfig

    frames, h, w = x.shape[1], x.shape[3], x.shape[4]
    rows, cols = h // 2, w // 2
    dtype = next(model.parameters()).dtype
    cache = KVCache(
        cfg.num_layers, 1, rows * cols, CacheConfig(frames), cfg.num_heads, cfg.head_dim, dtype, "cpu"
    )
    slots: CacheSlots = cache.begin(0, frames * rows * cols)
    rope = rope_for_rank(RopeGrid(frames, rows, cols, theta=cfg.rope_theta), 0, op=False)
    t = timestep_sinusoid(torch.full((frames,), 500.0), cfg.freq_dim).view(1, frames, -1)
    with torch.inference_mode():
        return model(x, t, model.cross_kv(prompt), SingleDeviceRunner(cache, slots, rope))


def test_apply_fp8_quantizes_exactly_the_selection(tiny_model, tiny_cfg, prompt):
    tq = pytest.importorskip("torchao.quantization")
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    names = fp8.apply_fp8(model, tq.Float8WeightOnlyConfig())
    assert names == fp8.fp8_linear_names(reference)
    converted = dict(reference.named_modules())
    for name, module in model.named_modules():
        if name in names:  # e4m3 buffers with a scale per output channel, the bias in the model dtype
            assert type(module) is E4M3Linear, name
            assert module.weight.dtype == torch.float8_e4m3fn and module.weight_scale.dtype == torch.float32
            assert module.weight.shape == converted[name].weight.shape
            assert module.weight_scale.shape == (1, module.weight.shape[0]), name
            assert module.bias.dtype == module.out_dtype == torch.bfloat16
        elif isinstance(module, torch.nn.Linear):
            assert type(module.weight) is torch.nn.Parameter and module.weight.dtype == torch.bfloat16, name
    # norms, modulation and the embeddings' parameters are untouched
    before = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if "modulation" in name or "norm" in name or "embedding" in name:
            assert torch.equal(p, before[name]), name
    # every norm before an FP8 GEMM quantizes its output; the FFNs fuse the GELU into the down
    # projection's input quantization (plugins/fp8_layers.py)
    for block in model.blocks:
        assert type(block.norm1) is E4M3ModulatedLayerNorm and type(block.norm2) is E4M3ModulatedLayerNorm
        assert type(block.norm3) is E4M3LayerNorm
    ffns = [m for m in model.modules() if isinstance(m, FeedForward)]
    assert ffns and all(type(m) is FP8FeedForward and isinstance(m[2], E4M3Linear) for m in ffns)
    # the quantized model runs, close to bf16: e4m3 weights carry a 2^-4 relative rounding step
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, tiny_cfg.in_dim, 8, 8, generator=g)
    out, ref = _forward(model, tiny_cfg, x, prompt), _forward(reference, tiny_cfg, x, prompt)
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1, rel


def test_precision_fp8_refused_on_the_cpu():
    for precision in ("fp8", "fp8-ffn"):
        with pytest.raises(
            ConfigError, match=rf"--precision {precision}: it needs a CUDA GPU of compute capability >= 8\.9"
        ):
            resolve(RunConfig.of(preset="tiny", precision=precision))
    with pytest.raises(ConfigError, match="--precision int4: choose one of"):
        resolve(RunConfig.of(preset="tiny", precision="int4"))


def test_pipeline_names_the_python_arguments():
    from ropesp import Pipeline

    with pytest.raises(ConfigError, match=r"^precision='int4': choose one of"):
        Pipeline(preset="tiny", device="cpu", precision="int4")
    with pytest.raises(
        ConfigError, match=r"^precision='fp8' quantizes|^precision='fp8': it needs a CUDA GPU"
    ):
        Pipeline(preset="tiny", device="cpu", precision="fp8")
    with pytest.raises(ConfigError, match=r"^attention='flash9': choose one of"):
        Pipeline(preset="tiny", device="cpu", attention="flash9")


def test_fp8_reasons_name_the_old_gpu_and_the_missing_library(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match=r"A100-SXM4-80GB has compute capability 8\.0; FP8 tensor cores"):
        fp8.check_fp8("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    with pytest.raises(
        BackendUnavailableError, match=r'--precision fp8: it needs torchao: pip install -e "\.\[fp8\]"'
    ):
        fp8.check_fp8("cuda")


def test_precision_fp8_refused_for_engines_and_other_dtypes(monkeypatch, tmp_path):
    monkeypatch.setattr(fp8, "check_fp8", lambda device, flag="--precision fp8": None)
    from ropesp.parallel import SPLayout
    from ropesp.runtime.pipeline import check_precision

    config = RunConfig.of(preset="tiny", precision="fp8")
    with pytest.raises(ConfigError, match="--precision fp8 quantizes the PyTorch model at load"):
        check_precision(config, "aoti", "cuda", "bfloat16", SPLayout(1, 1))
    with pytest.raises(
        ConfigError, match="--precision fp8 runs on bfloat16 activations, not --dtype float16"
    ):
        check_precision(config, "compile", "cuda", "float16", SPLayout(1, 1))
    check_precision(config, "compile", "cuda", "bfloat16", SPLayout(1, 1))


def test_cli_refuses_fp8_on_the_cpu_without_traceback(tmp_path):
    import subprocess

    out = tmp_path / "v.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "ropesp.cli", "generate", "--precision", "fp8", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--precision fp8: it needs a CUDA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_bench_refuses_fp8_configs_on_the_cpu():
    from ropesp.bench import BenchConfig

    with pytest.raises(ConfigError, match="--precision fp8"):
        BenchConfig(run=RunConfig.of(preset="tiny"), configs=("compile", "compile-fp8"))
    with pytest.raises(ConfigError, match="--precision fp8"):
        BenchConfig(run=RunConfig.of(preset="tiny"), configs=("compile-fp8attn",))
    with pytest.raises(ConfigError, match="--attention fa3"):
        BenchConfig(run=RunConfig.of(preset="tiny"), configs=("compile-fa3",))


def test_precision_and_attention_travel_to_a_served_model():
    """serve-repo stores the RunConfig as JSON: the ranks that load it run the same modes."""
    import json

    config = RunConfig.of(preset="tiny", precision="fp8", attention="fa3", backend="compile")
    back = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert (back.compute.precision, back.compute.attention) == ("fp8", "fa3") and back == config
