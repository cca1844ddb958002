"""The stream adapter (ropesp.model.wan): a checkpoint holds base weights + low-rank deltas, the loaded model
merges them into stream blocks that share every other tensor, and the runtime runs a chunk with them
exactly when its first frame is at or past stream_from_frame."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ropesp.config import ModelConfig, preset_of, tiny
from ropesp.errors import ConfigError
from ropesp.model.checkpoint import load_model, save_checkpoint
from ropesp.model.wan import STREAM_LINEARS, CausalWanDiT, init_weights
from ropesp.plugins import fp8
from ropesp.runtime.pipeline import build_session
from ropesp.settings import RunConfig

FROM_FRAME = 3


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return dataclasses.replace(tiny(), stream_rank=4, stream_from_frame=FROM_FRAME)


@pytest.fixture(scope="module")
def checkpoint(cfg, tmp_path_factory):
    """A tiny model with non-zero deltas, written as a Wan directory (shards + config.json)."""
    model = CausalWanDiT(cfg)
    init_weights(model, seed=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("ck") / "adapter", "wan-sharded")


def test_config_names_the_adapter_only_when_there_is_one(cfg, checkpoint):
    written = json.loads((checkpoint / "config.json").read_text())
    assert (written["stream_rank"], written["stream_from_frame"]) == (4, FROM_FRAME)
    assert "stream_rank" not in tiny().to_dict()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert preset_of(cfg) == "tiny"  # sizes and text encoder of the base architecture
    with pytest.raises(ConfigError, match="stream_rank=-1"):
        dataclasses.replace(tiny(), stream_rank=-1)


def test_loaded_model_merges_the_deltas_and_shares_the_rest(cfg, checkpoint):
    model, loaded_cfg = load_model(checkpoint, dtype=torch.float32)
    assert loaded_cfg == cfg
    assert model.stream_blocks is not None and len(model.stream_blocks) == cfg.num_layers
    for layer, (base, stream) in enumerate(zip(model.blocks, model.stream_blocks, strict=True)):
        deltas = model.stream_adapter.deltas(layer)
        for name, param in base.named_parameters():
            merged = stream.get_parameter(name)
            module = name.rpartition(".")[0]
            if module in STREAM_LINEARS and name.endswith("weight"):
                torch.testing.assert_close(merged, param + deltas[module].up @ deltas[module].down)
                assert merged.data_ptr() != param.data_ptr()
            else:
                assert merged is param, name  # shared, not copied
    keys = set(model.state_dict())
    assert not any(k.startswith("stream_blocks.") for k in keys)
    assert {k for k in keys if k.startswith("stream_adapter.")} == {
        f"stream_adapter.{i}.{n.replace('.', '_')}.{f}"
        for i in range(cfg.num_layers)
        for n in STREAM_LINEARS
        for f in ("down", "up")
    }
    names = fp8.fp8_linear_names(model)
    assert "stream_blocks.1.ffn.2" in names and "blocks.1.ffn.2" in names


def _flows(run: RunConfig, start_frames: list[int]) -> list[torch.Tensor]:
    """The flow of one chunk at each start frame (each a stream's first chunk there, cache empty)."""
    executor = build_session(run).executor
    executor.set_prompt(torch.randn(1, 8, 4096, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    out = []
    with torch.no_grad():
        for start in start_frames:
            executor.reset()
            out.append(executor.forward(x, torch.tensor(750.0), start))
    return out


def test_a_chunk_takes_the_stream_blocks_from_the_first_frame_on(checkpoint, tmp_path):
    """Before stream_from_frame a chunk is the base model's exactly; from it, the model whose weights
    are base + deltas (written as a plain checkpoint) gives the same flow."""
    model, cfg = load_model(checkpoint, dtype=torch.float32)
    base = {k: v for k, v in model.state_dict().items() if not k.startswith("stream_adapter.")}
    merged = dict(base)
    for k, v in model.stream_blocks.state_dict(keep_vars=False).items():
        merged["blocks." + k] = v
    plain = dataclasses.replace(cfg, stream_rank=0)
    paths = {}
    for name, sd in (("base", base), ("merged", merged)):
        paths[name] = save_checkpoint(sd, tmp_path / name, "wan-sharded", cfg=plain)
    run = dict(device="cpu", dtype="float32", latent_frames=12, latent_height=16, latent_width=16)
    run["local_attn_frames"] = 6  # a rolling cache may start a stream past frame 0
    starts = [0, FROM_FRAME - 1, FROM_FRAME, 6]
    got = _flows(RunConfig.of(checkpoint=str(checkpoint), **run), starts)
    want_base = _flows(RunConfig.of(checkpoint=str(paths["base"]), **run), starts)
    want_merged = _flows(RunConfig.of(checkpoint=str(paths["merged"]), **run), starts)
    for i, start in enumerate(starts):
        want = want_merged[i] if start >= FROM_FRAME else want_base[i]
        assert torch.equal(got[i], want), start
        assert not torch.allclose(want_merged[i], want_base[i], atol=1e-3), start


def test_fp8_stream_blocks_share_the_base_blocks_e4m3_weights(checkpoint):
    """Under FP8 GEMMs a stream block runs its base block's e4m3 weights (the same tensors: one rounding,
    which the base blocks' keys and values in the cache share) plus the adapter's delta on the same
    rounded input; what the adapter leaves alone is the base block's layer itself."""
    from ropesp.plugins.e4m3_rows import quant_ref
    from ropesp.plugins.fp8_layers import E4M3AdaptedLinear, E4M3Linear

    tq = pytest.importorskip("torchao.quantization")
    model, cfg = load_model(checkpoint, dtype=torch.bfloat16)
    names = fp8.apply_fp8(model, tq.Float8WeightOnlyConfig())
    # every block Linear of the stream blocks is selected, and none of them was quantized again
    assert set(fp8.stream_linears(model, names)) == {n for n in names if n.startswith("stream_blocks.")}
    assert len(fp8.stream_linears(model, names)) == len(names) // 2
    x = torch.randn(5, cfg.dim, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x8, x_scale = quant_ref(x.float())
    rounded = x8.float() * x_scale
    for layer, (base, stream) in enumerate(zip(model.blocks, model.stream_blocks, strict=True)):
        deltas = model.stream_adapter.deltas(layer)
        for name in [n.split(".", 2)[2] for n in names if n.startswith(f"blocks.{layer}.")]:
            b, s = base.get_submodule(name), stream.get_submodule(name)
            assert type(b) is E4M3Linear, name
            if name not in deltas:
                assert s is b, name
                continue
            assert type(s) is E4M3AdaptedLinear and s.weight is b.weight and s.bias is b.bias, name
            if s.weight.shape[1] == cfg.dim:
                want = b(x).float() + rounded @ deltas[name].delta().t()
                torch.testing.assert_close(s(x).float(), want, rtol=2**-7, atol=2e-2)  # bf16 output
