"""Checkpoint layouts round-trip exactly; bad checkpoints fail with one actionable CheckpointError."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ropesp.config import ModelConfig, tiny
from ropesp.errors import CheckpointError
from ropesp.model.checkpoint import (
    DIFFUSERS_NAMES,
    from_diffusers_key,
    infer_config,
    load_model,
    load_state_dict,
    save_checkpoint,
    to_diffusers_key,
)
from ropesp.model.rope import rope_apply_ref
from ropesp.model.wan import CausalWanDiT, init_weights, timestep_sinusoid


@pytest.fixture(scope="module")
def model() -> CausalWanDiT:
    m = CausalWanDiT(tiny())
    init_weights(m, seed=7)
    return m.eval()


@pytest.fixture(scope="module")
def sd(model: CausalWanDiT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _outputs(m: CausalWanDiT) -> list[torch.Tensor]:
    """Cross-attention K/V of every layer and patch tokens for a fixed input."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, 5, m.cfg.text_dim, generator=g)  # [B, Lt, text_dim]
    latents = torch.randn(1, 2, m.cfg.in_dim, 8, 8, generator=g)  # [B, F, C, H, W]
    with torch.no_grad():
        kv = [t for pair in m.cross_kv(prompt) for t in pair]
        return [*kv, m.patchify(latents)]


def _assert_same_model(loaded: CausalWanDiT, ref: CausalWanDiT) -> None:
    a, b = loaded.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for x, y in zip(_outputs(loaded), _outputs(ref), strict=True):
        assert torch.equal(x, y)


def _prefixed(sd: dict, prefix: str, block_fragment: str = "") -> dict:
    """Keys as a wrapped training run writes them, e.g. model._fsdp_wrapped_module.blocks.0.<frag>..."""
    out = {}
    for k, v in sd.items():
        if block_fragment and k.startswith("blocks."):
            head, num, rest = k.split(".", 2)
            k = f"{head}.{num}.{block_fragment}{rest}"
        out[prefix + k] = v
    return out


# Each writer returns the path handed to the loader.
WRITERS = {
    "self-forcing": lambda d, sd: save_checkpoint(sd, d / "sf.pt", "self-forcing"),
    "fsdp": lambda d, sd: _torch_save(
        {"generator_ema": _prefixed(sd, "model._fsdp_wrapped_module.", "_checkpoint_wrapped_module.")},
        d / "fsdp.pt",
    ),
    "compiled": lambda d, sd: _torch_save({"generator_ema": _prefixed(sd, "model._orig_mod.")}, d / "c.pth"),
    "generator-only": lambda d, sd: _torch_save(
        {"generator": _prefixed(sd, "model."), "critic": {"x": torch.zeros(3)}, "step": 10}, d / "g.pt"
    ),
    "model-key": lambda d, sd: _torch_save({"model": sd}, d / "m.bin"),
    "bare": lambda d, sd: _torch_save(sd, d / "bare.pt"),
    "legacy-pickle": lambda d, sd: _torch_save(
        {"generator_ema": _prefixed(sd, "model.")}, d / "old.pt", _use_new_zipfile_serialization=False
    ),
    "wan": lambda d, sd: save_checkpoint(sd, d / "w.safetensors", "wan"),
    "wan-sharded-index": lambda d, sd: (
        save_checkpoint(sd, d / "ws", "wan-sharded") / "diffusion_pytorch_model.safetensors.index.json"
    ),
    "wan-sharded-dir": lambda d, sd: save_checkpoint(sd, d / "ws", "wan-sharded", num_shards=3),
    "diffusers": lambda d, sd: save_checkpoint(sd, d / "hf", "diffusers"),
    "diffusers-pipeline-root": lambda d, sd: (
        save_checkpoint(sd, d / "pipe" / "transformer", "diffusers").parent
    ),
}


def _torch_save(obj: object, path: Path, **kw) -> Path:
    torch.save(obj, path, **kw)
    return path


@pytest.mark.parametrize("layout", list(WRITERS))
def test_checkpoint_layouts_round_trip(layout: str, tmp_path: Path, model: CausalWanDiT, sd: dict) -> None:
    path = WRITERS[layout](tmp_path, sd)
    loaded, cfg = load_model(path, None, dtype=torch.float32)
    assert cfg == tiny()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    _assert_same_model(loaded, model)


def test_checkpoint_wan_sharded_writes_shards_and_config(tmp_path: Path, sd: dict) -> None:
    out = save_checkpoint(sd, tmp_path / "ws", "wan-sharded")
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(sd)
    _, cfg = load_state_dict(out)
    assert cfg == tiny()


def test_checkpoint_prefers_generator_ema(tmp_path: Path, model: CausalWanDiT, sd: dict) -> None:
    zeros = {f"model.{k}": torch.zeros_like(v) for k, v in sd.items()}
    path = _torch_save({"generator": zeros, "generator_ema": _prefixed(sd, "model.")}, tmp_path / "both.pt")
    loaded, _ = load_model(path, tiny(), dtype=torch.float32)
    _assert_same_model(loaded, model)


def test_checkpoint_diffusers_names_are_a_bijection(sd: dict) -> None:
    renamed = [to_diffusers_key(k) for k in sd]
    assert len(set(renamed)) == len(sd)
    assert [from_diffusers_key(k) for k in renamed] == list(sd)
    assert to_diffusers_key("blocks.1.norm3.weight") == "blocks.1.norm2.weight"
    assert to_diffusers_key("blocks.1.self_attn.o.bias") == "blocks.1.attn1.to_out.0.bias"
    assert to_diffusers_key("blocks.0.cross_attn.norm_k.weight") == "blocks.0.attn2.norm_k.weight"
    assert to_diffusers_key("head.modulation") == "scale_shift_table"
    assert to_diffusers_key("blocks.0.modulation") == "blocks.0.scale_shift_table"
    assert to_diffusers_key("time_projection.1.weight") == "condition_embedder.time_proj.weight"
    assert len(DIFFUSERS_NAMES) == len(set(DIFFUSERS_NAMES.values()))


def test_checkpoint_diffusers_matches_real_diffusers(tmp_path: Path, model: CausalWanDiT, sd: dict) -> None:
    diffusers = pytest.importorskip("diffusers")
    out = save_checkpoint(model, tmp_path / "hf", "diffusers")
    hf = diffusers.WanTransformer3DModel.from_config(json.loads((out / "config.json").read_text()))
    hf.load_state_dict(load_file(out / "diffusion_pytorch_model.safetensors"), strict=True)
    hf_sd = hf.state_dict()
    assert set(hf_sd) == {to_diffusers_key(k) for k in sd}
    for k, v in sd.items():
        assert torch.equal(hf_sd[to_diffusers_key(k)], v), k
    hf.save_pretrained(tmp_path / "hf2")  # diffusers' own writer (and config.json) loads back
    loaded, cfg = load_model(tmp_path / "hf2", None, dtype=torch.float32)
    assert cfg == tiny()
    _assert_same_model(loaded, model)


class _WholeChunk:
    """ChunkRunner for one chunk at frame 0 with no cache: full attention within the chunk."""

    first_token = 0

    def __init__(self, frames: int, rows: int, cols: int, theta: float) -> None:
        self.rope = functools.partial(
            rope_apply_ref, start_frame=0, frames=frames, rows=rows, cols=cols, theta=theta
        )

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),  # [B, H, L, D]
        )
        return o.transpose(1, 2)  # [B, L, H, D]


def test_checkpoint_diffusers_forward_parity(tmp_path: Path, model: CausalWanDiT) -> None:
    """Renamed weights drive diffusers' own WanTransformer3DModel to the same flow prediction."""
    diffusers = pytest.importorskip("diffusers")
    out = save_checkpoint(model, tmp_path / "hf", "diffusers")
    hf = diffusers.WanTransformer3DModel.from_config(json.loads((out / "config.json").read_text()))
    hf.load_state_dict(load_file(out / "diffusion_pytorch_model.safetensors"), strict=True)
    cfg, frames, height, width, t = model.cfg, 2, 8, 8, 700.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, frames, cfg.in_dim, height, width, generator=g)  # [B, F, C, H, W]
    prompt = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)  # full length: no padding
    with torch.no_grad():
        ref = hf.eval()(x.transpose(1, 2), torch.tensor([t]), prompt, return_dict=False)[0]  # [B, C, F, H, W]
        t_sin = timestep_sinusoid(torch.full((frames,), t), cfg.freq_dim).view(1, frames, -1)  # [B, F, freq]
        runner = _WholeChunk(frames, height // 2, width // 2, cfg.rope_theta)
        ours = model(x, t_sin, model.cross_kv(prompt), runner)  # [B, F, C, H, W]
    torch.testing.assert_close(ours, ref.transpose(1, 2), atol=1e-4, rtol=1e-4)


def test_checkpoint_config_sources(tmp_path: Path, sd: dict) -> None:
    assert load_state_dict(save_checkpoint(sd, tmp_path / "a.pt", "self-forcing"))[1] is None
    assert load_state_dict(save_checkpoint(sd, tmp_path / "hf", "diffusers"))[1] == tiny()
    other = dataclasses.replace(tiny(), eps=1e-5)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(other.to_dict()))
    _, cfg = load_state_dict(tmp_path / "a.pt", model_config_path=cfg_path)
    assert cfg == other
    _, cfg = load_model(tmp_path / "a.pt", None, model_config_path=cfg_path, dtype=torch.float32)
    assert cfg == other


def test_checkpoint_bad_sidecar_config_is_named(tmp_path: Path, sd: dict) -> None:
    out = save_checkpoint(sd, tmp_path / "ws", "wan-sharded")
    (out / "config.json").write_text(json.dumps({"dim": 192}))
    with pytest.raises(CheckpointError, match=r"config\.json.*lacks required fields"):
        load_state_dict(out)


def test_infer_config_picks_tiny(sd: dict) -> None:
    assert infer_config(sd) == tiny()


def test_infer_config_refuses_unknown_shapes() -> None:
    odd = dataclasses.replace(tiny(), dim=96, num_layers=3)
    m = CausalWanDiT(odd)
    with pytest.raises(CheckpointError) as err:
        infer_config(m.state_dict())
    msg = str(err.value)
    assert "tiny" in msg and "wan2.1-1.3b" in msg and "wan2.1-14b" in msg and "--model-config" in msg
    assert "dim 96" in msg and "3 blocks" in msg


def test_load_model_lists_every_mismatch_at_once(tmp_path: Path, sd: dict) -> None:
    bad = dict(sd)
    del bad["head.head.bias"], bad["blocks.1.norm3.weight"]
    bad["blocks.0.extra.weight"] = torch.zeros(2)
    bad["blocks.0.ffn.0.weight"] = torch.zeros(5, 192)
    path = save_checkpoint(bad, tmp_path / "bad.safetensors", "wan")
    with pytest.raises(CheckpointError) as err:
        load_model(path, tiny(), dtype=torch.float32)
    msg = str(err.value)
    assert str(path) in msg
    assert "2 missing keys: blocks.1.norm3.weight, head.head.bias" in msg
    assert "1 unexpected keys: blocks.0.extra.weight" in msg
    assert "1 shape mismatches: blocks.0.ffn.0.weight (checkpoint [5, 192], model [768, 192])" in msg


def test_load_model_truncates_long_key_lists(tmp_path: Path, sd: dict) -> None:
    path = save_checkpoint(sd, tmp_path / "a.pt", "self-forcing")
    small = dataclasses.replace(tiny(), num_layers=1)
    with pytest.raises(CheckpointError, match=r"27 unexpected keys: blocks\.1\..*\(\+17 more\)"):
        load_model(path, small, dtype=torch.float32)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a checkpoint\xff" * 64)


def _truncated_pt(path: Path, sd: dict) -> None:
    torch.save({"generator_ema": sd}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncated_safetensors(path: Path, sd: dict) -> None:
    save_file(sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPT = {
    "garbage.pt": lambda p, sd: _garbage(p),
    "garbage.safetensors": lambda p, sd: _garbage(p),
    "truncated.pt": _truncated_pt,
    "truncated.safetensors": _truncated_safetensors,
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_load_model_corrupt_file_names_it(name: str, tmp_path: Path, sd: dict) -> None:
    path = tmp_path / name
    CORRUPT[name](path, sd)
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as err:
        load_model(path, None, dtype=torch.float32)
    assert str(path) in str(err.value)
    assert err.value.__cause__ is not None
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)  # never advise unpickling


@pytest.mark.parametrize("flag", ["--checkpoint", "--prompt-embeds"])
def test_random_bytes_file_gets_one_line(flag: str, tmp_path: Path, capsys) -> None:
    from ropesp.cli import main

    path = tmp_path / "random.pt"
    path.write_bytes(bytes(range(256)) * 16)
    size = ["--latent-height", "8", "--latent-width", "8", "--latent-frames", "3"]
    model = [] if flag == "--checkpoint" else ["--preset", "tiny"]  # a checkpoint brings its own model
    args = ["generate", *model, *size]
    assert main([*args, flag, str(path), "--output", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err, err
    assert "weights_only" not in err and "ropesp never unpickles other objects" in err


def test_load_model_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"checkpoint {path} does not exist"):
        load_model(path, None, dtype=torch.float32)


def test_load_model_missing_shard(tmp_path: Path, sd: dict) -> None:
    out = save_checkpoint(sd, tmp_path / "ws", "wan-sharded")
    (out / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.safetensors does not exist"):
        load_state_dict(out)


@pytest.mark.parametrize(
    "obj",
    [{"step": 3, "config": "x"}, {"generator_ema": {"a": 1}}, {}, [torch.zeros(2)]],
    ids=["no-tensors", "non-tensor-values", "empty", "list"],
)
def test_load_state_dict_unknown_layout(obj: object, tmp_path: Path) -> None:
    path = _torch_save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint {path} has no state dict"):
        load_state_dict(path)


def test_load_state_dict_empty_directory_and_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="holds no"):
        load_state_dict(tmp_path)
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unknown suffix"):
        load_state_dict(tmp_path / "w.onnx")


@pytest.mark.parametrize("fmt", ["self-forcing", "wan"])
def test_load_model_casts_to_dtype(fmt: str, tmp_path: Path, model: CausalWanDiT, sd: dict) -> None:
    path = save_checkpoint(sd, tmp_path / ("w.pt" if fmt == "self-forcing" else "w.safetensors"), fmt)
    loaded, _ = load_model(path, None, dtype=torch.bfloat16)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.bfloat16 and v.device.type == "cpu", k
        assert torch.equal(v, sd[k].to(torch.bfloat16)), k


def test_load_model_without_checkpoint_is_seeded(model: CausalWanDiT) -> None:
    loaded, cfg = load_model(None, tiny(), dtype=torch.float32, seed=7)
    assert cfg == tiny()
    _assert_same_model(loaded, model)
    with pytest.raises(CheckpointError, match="no checkpoint and no model config"):
        load_model(None, None, dtype=torch.float32)


def test_save_checkpoint_self_forcing_layout(tmp_path: Path, sd: dict) -> None:
    path = save_checkpoint(sd, tmp_path / "sf.pt", "self-forcing")
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["generator_ema"]
    assert list(raw["generator_ema"]) == [f"model.{k}" for k in sd]


def test_diffusers_config_round_trip(tmp_path: Path, sd: dict) -> None:
    out = save_checkpoint(sd, tmp_path / "hf", "diffusers", cfg=tiny())
    raw = json.loads((out / "config.json").read_text())
    assert raw["_class_name"] == "WanTransformer3DModel" and raw["qk_norm"] == "rms_norm_across_heads"
    assert ModelConfig.from_json(out / "config.json") == tiny()
    raw["qk_norm"] = None
    (out / "config.json").write_text(json.dumps(raw))
    assert ModelConfig.from_json(out / "config.json").qk_norm is False
