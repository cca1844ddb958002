"""--model-dir resolution: the diffusers Wan layout, the checkpoint override, and clear errors."""

from __future__ import annotations

import shutil

import helpers_media
import pytest
import torch

from ropesp.errors import CheckpointError
from ropesp.model_dir import resolve_model_dir


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    pytest.importorskip("diffusers")
    return helpers_media.make_model_dir(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-1.3B-Diffusers")


def _copy_without(root, tmp_path, *parts):
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    for part in parts:
        target = dst / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return dst


def test_model_dir_complete(model_root):
    md = resolve_model_dir(model_root)
    assert md.vae == model_root / "vae"
    assert md.text_encoder == model_root / "text_encoder"
    assert md.tokenizer == model_root / "tokenizer"
    assert md.transformer == md.dit_weights == model_root / "transformer"
    assert md.checkpoint is None


def test_model_dir_checkpoint_overrides_transformer(model_root, tmp_path):
    ckpt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": {}}, ckpt)
    assert resolve_model_dir(model_root, ckpt).dit_weights == ckpt
    no_dit = _copy_without(model_root, tmp_path, "transformer")
    md = resolve_model_dir(no_dit, ckpt)
    assert md.transformer is None and md.dit_weights == ckpt


def test_model_dir_parts_load(model_root):
    """The resolved paths feed the loaders directly."""
    from ropesp.decode.wan_vae import load_wan_vae
    from ropesp.text_encoder import load_text_encoder

    md = resolve_model_dir(model_root)
    assert load_wan_vae(md.vae).config.z_dim == 16
    te = load_text_encoder(md.text_encoder, tokenizer_path=md.tokenizer)
    assert te.encode("a cat").shape == (1, 512, helpers_media.TINY_TEXT_DIM)


def test_model_dir_original_vae_file(model_root, tmp_path):
    root = _copy_without(model_root, tmp_path, "vae")
    helpers_media.save_wan_vae_original(helpers_media.make_tiny_wan_vae(), root / "Wan2.1_VAE.pth")
    assert resolve_model_dir(root).vae == root / "Wan2.1_VAE.pth"


def test_model_dir_missing_parts_listed(model_root, tmp_path):
    root = _copy_without(model_root, tmp_path, "transformer", "tokenizer")
    with pytest.raises(CheckpointError) as err:
        resolve_model_dir(root)
    msg = str(err.value)
    assert "found ['text_encoder/', 'vae/']" in msg
    assert "transformer/ (config.json" in msg and "tokenizer/ (tokenizer.json or spiece.model)" in msg
    assert "--checkpoint" in msg


def test_a_crowded_wrong_model_dir_is_listed_in_part(tmp_path):
    for i in range(40):
        (tmp_path / f"file{i:02d}.txt").write_text("x")
    with pytest.raises(CheckpointError) as err:
        resolve_model_dir(tmp_path)
    msg = str(err.value)
    assert "found ['file00.txt', 'file01.txt'," in msg and "'file11.txt', ... (+28 more)]" in msg
    assert "file12.txt" not in msg and "missing vae/" in msg


def test_model_dir_partial_parts(model_root, tmp_path):
    root = _copy_without(
        model_root, tmp_path, "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json"
    )
    with pytest.raises(
        CheckpointError,
        match=r"vae/ lacks diffusion_pytorch_model.safetensors.*"
        r"text_encoder/ lacks config.json",
    ):
        resolve_model_dir(root)


def test_model_dir_transformer_required_without_checkpoint(model_root, tmp_path):
    root = _copy_without(model_root, tmp_path, "transformer/diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer/ lacks diffusion_pytorch_model\*\.safetensors"):
        resolve_model_dir(root)
    assert resolve_model_dir(root, root / "transformer" / "config.json").transformer is None


def test_model_dir_bad_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="found nothing"):
        resolve_model_dir(tmp_path)
    with pytest.raises(CheckpointError, match=r"--checkpoint .*missing\.pt does not exist"):
        resolve_model_dir(tmp_path, tmp_path / "missing.pt")


def test_a_loaders_message_names_the_checkpoint_as_the_caller_gave_it():
    """resolve's rewording of the checkpoint loader's messages: the path given becomes the flag (or the
    Python argument); a message about another path (the file found in a directory, a longer name that
    begins with the same letters) keeps it, after the flag."""
    from ropesp.errors import python_names
    from ropesp.runtime.pipeline import _named

    assert (
        _named("checkpoint /x/w: unknown suffix", "checkpoint", "/x/w") == "--checkpoint /x/w: unknown suffix"
    )
    assert (
        _named("checkpoint /x/w does not exist", "checkpoint", "/x/w/") == "--checkpoint /x/w/ does not exist"
    )
    assert (
        _named("checkpoint /x/weights.pt has no state dict", "checkpoint", "/x/w")
        == "--checkpoint /x/w: checkpoint /x/weights.pt has no state dict"
    )
    with python_names():
        assert (
            _named("checkpoint /x/w: unknown suffix", "checkpoint", "/x/w")
            == "checkpoint='/x/w': unknown suffix"
        )
