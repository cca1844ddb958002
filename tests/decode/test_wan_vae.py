"""Streaming Wan2.1 VAE decode: chunked decoding equals one full `vae.decode`, in both checkpoint layouts."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import helpers_media

from ropesp.decode.factory import WarmUp, make_decoder
from ropesp.decode.preview import PreviewDecoder, to_uint8
from ropesp.decode.wan_vae import (
    WanVAEDecoder,
    diffusers_to_original,
    infer_original_config,
    load_wan_vae,
    set_conv_layout,
    wan_vae_key_map,
)
from ropesp.errors import CheckpointError

LATENT_FRAMES, ROWS, COLS = 9, 4, 6  # non-square, so a rows/cols mix-up changes the shape


@pytest.fixture(scope="module")
def vae():
    return helpers_media.make_tiny_wan_vae(seed=0)


@pytest.fixture(scope="module")
def saved(vae, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_vae")
    return {
        "diffusers": helpers_media.save_wan_vae_diffusers(vae, root / "vae"),
        "original": helpers_media.save_wan_vae_original(vae, root / "Wan2.1_VAE.pth"),
    }


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, LATENT_FRAMES, 16, ROWS, COLS, generator=g)  # [B, F, C, h, w], normalized


@pytest.fixture(scope="module")
def reference(vae, latents):
    """One non-streaming diffusers decode of all latents: [B, 3, N, H, W] in [-1, 1]."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(latents.transpose(1, 2) * std + mean).sample  # [B, C, F, h, w] in


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_wan_vae_stream_equals_full_decode(layout, saved, latents, reference):
    decoder = WanVAEDecoder(load_wan_vae(saved[layout]))
    chunks = [decoder.decode_video(latents[:, f : f + 3]) for f in range(0, LATENT_FRAMES, 3)]
    assert [c.shape[2] for c in chunks] == [9, 12, 12]
    video = torch.cat(chunks, dim=2)
    assert video.shape == (1, 3, 33, 8 * ROWS, 8 * COLS) == reference.shape
    assert reference.std() > 0.05  # not a degenerate (constant or saturated) output
    torch.testing.assert_close(video, reference, atol=0, rtol=0)


def test_wan_vae_uint8_frames_and_reset(vae, latents, reference):
    decoder = WanVAEDecoder(vae)
    frames = [decoder.decode(latents[:, f : f + 3]) for f in range(0, LATENT_FRAMES, 3)]
    assert [(f.dtype, f.shape) for f in frames] == [
        (torch.uint8, (1, n, 8 * ROWS, 8 * COLS, 3)) for n in (9, 12, 12)
    ]
    expected = to_uint8(reference.permute(0, 2, 3, 4, 1))  # [B, N, H, W, 3]
    assert torch.equal(torch.cat(frames, dim=1), expected)
    decoder.reset()  # a new stream starts with 1 + 4 frames per latent frame again
    assert torch.equal(decoder.decode(latents[:, :3]), expected[:, :9])


def test_wan_vae_warm_up_leaves_a_fresh_stream(vae, latents, reference):
    """warm_up decodes throw-away zero streams (where a compiled decoder builds its graphs) and resets:
    the next stream starts with 9 frames and equals the full decode."""
    decoder = WanVAEDecoder(vae)
    assert decoder.warm_up(ROWS, COLS, chunk_frames=3, streams=1) > 0
    chunks = [decoder.decode_video(latents[:, f : f + 3]) for f in range(0, LATENT_FRAMES, 3)]
    assert [c.shape[2] for c in chunks] == [9, 12, 12]
    torch.testing.assert_close(torch.cat(chunks, dim=2), reference, atol=0, rtol=0)


def test_wan_vae_uneven_chunks(vae, latents, reference):
    """An independent first frame ([1, 4, 4] latent frames) gives 1, 16, 16 frames, still exact."""
    decoder = WanVAEDecoder(vae)
    chunks = [decoder.decode_video(latents[:, a:b]) for a, b in ((0, 1), (1, 5), (5, 9))]
    assert [c.shape[2] for c in chunks] == [1, 16, 16]
    torch.testing.assert_close(torch.cat(chunks, dim=2), reference, atol=0, rtol=0)


def _full_size_vae():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        return AutoencoderKLWan()  # diffusers' defaults are Wan2.1's VAE (base_dim 96, z_dim 16)


def test_wan_vae_channels_last_layout(vae, latents, reference):
    """Channels-last weights (the CUDA default) change the layout, not the values: same frames, and the
    default layout comes back. Tolerance: oneDNN's channels-last fp32 kernels sum in an order that varies
    from process to process (the default layout matches the reference exactly); the largest difference in
    26 processes on the CI machine was 2.5e-5 on [-1, 1] pixels (1e-5 failed 1 run in 3), so 1e-4: 4x that,
    and 80x below one uint8 level; a layout mistake moves pixels by ~0.1."""
    vae = copy.deepcopy(vae)  # the reference's weights; the shared fixture keeps its layout
    decoder = WanVAEDecoder(vae, channels_last=True)
    conv3d = vae.decoder.conv_in.weight
    assert conv3d.is_contiguous(memory_format=torch.channels_last_3d) and not conv3d.is_contiguous()
    conv2d = vae.decoder.up_blocks[0].upsamplers[0].resample[1].weight
    assert conv2d.is_contiguous(memory_format=torch.channels_last) and not conv2d.is_contiguous()
    chunks = [decoder.decode_video(latents[:, f : f + 3]) for f in range(0, LATENT_FRAMES, 3)]
    torch.testing.assert_close(torch.cat(chunks, dim=2), reference, rtol=0, atol=1e-4)
    set_conv_layout(vae, channels_last=False)
    assert conv3d.is_contiguous() and conv2d.is_contiguous()
    assert WanVAEDecoder(vae).vae.decoder.conv_in.weight.is_contiguous()  # CPU default: layout kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 cuDNN convolutions)")
def test_wan_vae_compiled_channels_last_on_cuda(vae, latents):
    """torch.compile + channels-last (bf16, CUDA) streams frames as accurate as the eager bf16 decoder:
    both against one fp32 decode, chunk by chunk and across a reset. Bounds relative to eager bf16's own
    error, because bf16 rounding through this tiny VAE (random, unit-gain layers) alone reaches ~0.2."""
    exact = WanVAEDecoder(copy.deepcopy(vae).to("cuda"), channels_last=False)
    eager = WanVAEDecoder(copy.deepcopy(vae).to("cuda", torch.bfloat16), channels_last=False)
    fast = WanVAEDecoder(copy.deepcopy(vae).to("cuda", torch.bfloat16), channels_last=True, compile=True)
    chunks = [latents[:, f : f + 3] for f in range(0, LATENT_FRAMES, 3)]
    with torch.backends.cudnn.flags(allow_tf32=False):
        expected = torch.cat([exact.decode_video(c) for c in chunks], dim=2)
    eager_err = (torch.cat([eager.decode_video(c) for c in chunks], dim=2) - expected).abs()
    for _ in range(2):  # the second stream reuses the graphs of the first
        fast.reset()
        got = [fast.decode_video(c) for c in chunks]
        assert [g.shape[2] for g in got] == [9, 12, 12]
        err = (torch.cat(got, dim=2) - expected).abs()
        summary = f"compiled max {err.max():.4f} mean {err.mean():.5f}; eager bf16 max {eager_err.max():.4f} mean {eager_err.mean():.5f}"
        assert err.mean() <= 1.5 * eager_err.mean() + 1e-3, summary
        assert err.max() <= 2 * eager_err.max() + 1e-2, summary


@pytest.mark.parametrize("size", ["tiny", "wan2.1"])
def test_wan_vae_key_map_matches_diffusers_converter(size, vae):
    """Our structural rename agrees with diffusers' own (hard-coded, Wan2.1-specific) converter."""
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = vae if size == "tiny" else _full_size_vae()
    key_map = wan_vae_key_map(model)
    assert len(set(key_map.values())) == len(key_map)  # one-to-one
    original = diffusers_to_original(model.state_dict(), model)
    back = convert_wan_vae_to_diffusers(original)
    assert sorted(back) == sorted(model.state_dict())
    assert all(back[new] is original[old] for new, old in key_map.items())


def test_wan_vae_key_map_original_names():
    """Literal names of Wan's wan/modules/vae.py structure (Encoder3d/Decoder3d Sequentials)."""
    names = set(wan_vae_key_map(_full_size_vae()).values())
    expected = {
        "conv1.weight",
        "conv2.bias",
        "encoder.conv1.weight",
        "encoder.head.0.gamma",
        "encoder.head.2.weight",
        "encoder.downsamples.0.residual.0.gamma",
        "encoder.downsamples.0.residual.6.weight",
        "encoder.downsamples.2.resample.1.weight",  # stage 0: downsample2d, no time_conv
        "encoder.downsamples.3.shortcut.weight",  # 96 -> 192 channels
        "encoder.downsamples.5.time_conv.weight",  # stage 1: downsample3d
        "encoder.middle.0.residual.2.bias",
        "encoder.middle.1.to_qkv.weight",
        "encoder.middle.2.residual.3.gamma",
        "decoder.conv1.weight",
        "decoder.middle.1.proj.bias",
        "decoder.upsamples.3.time_conv.weight",
        "decoder.upsamples.3.resample.1.weight",
        "decoder.upsamples.4.shortcut.weight",  # 192 -> 384 after the first upsample halves the width
        "decoder.upsamples.7.time_conv.bias",
        "decoder.upsamples.11.resample.1.weight",
        "decoder.upsamples.14.residual.6.weight",
        "decoder.head.0.gamma",
        "decoder.head.2.bias",
    }
    assert expected <= names
    assert "decoder.upsamples.11.time_conv.weight" not in names  # last upsample is 2-D only
    assert "decoder.upsamples.15.residual.0.gamma" not in names


def test_infer_original_config_wan21():
    model = _full_size_vae()
    cfg = infer_original_config(diffusers_to_original(model.state_dict(), model), "Wan2.1_VAE.pth")
    assert cfg == {
        "base_dim": 96,
        "decoder_base_dim": 96,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "temperal_downsample": [False, True, True],
    }


def test_wan_vae_bfloat16(saved, latents, reference):
    decoder = WanVAEDecoder(load_wan_vae(saved["diffusers"], dtype=torch.bfloat16))
    assert next(decoder.vae.parameters()).dtype == torch.bfloat16
    video = decoder.decode_video(latents[:, :3])
    assert video.dtype == torch.float32 and video.shape == reference[:, :, :9].shape
    assert (video - reference[:, :, :9]).abs().mean() < 0.05


def test_wan_vae_load_errors(saved, vae, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_wan_vae(tmp_path / "nope")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"lacks \['diffusion_pytorch_model.safetensors'\]"):
        load_wan_vae(tmp_path / "vae")

    state = torch.load(saved["original"], weights_only=True)
    del state["decoder.upsamples.4.shortcut.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"(?s)partial\.pth.*decoder\.upsamples\.4\.shortcut\.weight"):
        load_wan_vae(tmp_path / "partial.pth")

    state = torch.load(saved["original"], weights_only=True)
    state["decoder.head.2.bias"] = torch.zeros(4)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"(?s)shape\.pth.*decoder\.conv_out\.bias"):
        load_wan_vae(tmp_path / "shape.pth")

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_wan_vae(tmp_path / "list.pth")

    from safetensors.torch import save_file

    save_file(vae.state_dict(), str(tmp_path / "diffusers_named.safetensors"))
    with pytest.raises(CheckpointError, match="without a config"):
        load_wan_vae(tmp_path / "diffusers_named.safetensors")


def test_wan_vae_rejects_bad_latents(vae):
    with pytest.raises(ValueError, match=r"\[B, F, 16, h, w\]"):
        WanVAEDecoder(vae).decode(torch.zeros(1, 3, 8, 4, 4))


def test_make_decoder_builds_each_decoder_and_warms_up_only_a_compiled_one(
    saved, latents, monkeypatch, tmp_path
):
    preview = make_decoder(None, "cpu")
    assert isinstance(preview, PreviewDecoder) and preview.device == torch.device("cpu")
    warmed: list[tuple] = []
    monkeypatch.setattr(WanVAEDecoder, "warm_up", lambda self, *size: warmed.append(size) or 0.0)
    for layout in ("diffusers", "original"):
        dec = make_decoder(str(saved[layout]), "cpu", warm_up=WarmUp(ROWS, COLS, 3))
        assert next(dec.vae.parameters()).dtype == torch.float32 and not dec.compiled
        direct = WanVAEDecoder.from_path(saved[layout])
        assert torch.equal(dec.decode(latents[:, :3]), direct.decode(latents[:, :3]))
    assert warmed == []  # eager: nothing to build ahead
    compiled = make_decoder(str(saved["diffusers"]), "cpu", compile=True, warm_up=WarmUp(ROWS, COLS, 3))
    assert compiled.compiled and warmed == [(ROWS, COLS, 3)]
    with pytest.raises(CheckpointError, match="does not exist"):
        make_decoder(str(tmp_path / "nope"), "cpu")
