"""`ropesp generate` with text prompts (umT5), --model-dir and the streaming Wan VAE, and their errors."""

from __future__ import annotations

import shutil

import helpers_media
import numpy as np
import pytest
import torch

from ropesp.cli import main
from ropesp.video import read_video_info

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

SMALL = ["--latent-frames", "6", "--latent-height", "8", "--latent-width", "12"]  # 21 frames of 64x96


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conv-heavy VAE on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def te_root(tmp_path_factory, tiny_cfg):
    """A 1-layer umT5 whose d_model is the tiny DiT's text_dim (4096), with small heads and FFN: ~2M weights."""
    from transformers import UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("umt5-4096")
    torch.manual_seed(0)
    cfg = UMT5Config(
        vocab_size=helpers_media.TINY_VOCAB_SIZE,
        d_model=tiny_cfg.text_dim,
        d_kv=8,
        d_ff=16,
        num_layers=1,
        num_heads=2,
    )
    UMT5EncoderModel(cfg).eval().save_pretrained(str(root / "text_encoder"))
    helpers_media.make_tiny_tokenizer().save_pretrained(str(root / "tokenizer"))
    return root


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    """diffusers layout with the tiny VAE, a 32-dim umT5 and a placeholder transformer/."""
    return helpers_media.make_model_dir(tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-1.3B-Diffusers")


@pytest.fixture(scope="module")
def sf_ckpt(tmp_path_factory, tiny_model):
    from ropesp.model.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "self_forcing_dmd.pt"
    save_checkpoint(tiny_model, path, "self-forcing")
    return path


def _mp4_frames(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])


def test_generate_prompt_with_text_encoder(tmp_path, te_root, capsys):
    from ropesp.text_encoder import load_text_encoder

    mp4, lat = tmp_path / "cat.mp4", tmp_path / "cat.pt"
    args = ["generate", "--preset", "tiny", *SMALL, "--output", str(mp4), "--overwrite"]
    assert main([*args, "--prompt", "a cat", "--text-encoder", str(te_root), "--latents-out", str(lat)]) == 0
    err = capsys.readouterr().err
    assert "encoding the prompt with umT5" in err and "decoder: preview" in err
    assert read_video_info(mp4) == (21, 64, 96)

    emb = load_text_encoder(te_root).encode("a cat")  # [1, 512, 4096], what --prompt computed
    assert emb.shape == (1, 512, 4096) and emb.abs().sum() > 0
    torch.save(emb, tmp_path / "cat-embeds.pt")
    lat2 = tmp_path / "embeds.pt"
    assert main([*args, "--prompt-embeds", str(tmp_path / "cat-embeds.pt"), "--latents-out", str(lat2)]) == 0
    assert torch.equal(torch.load(lat), torch.load(lat2))

    lat3 = tmp_path / "dog.pt"
    assert main([*args, "--prompt", "a dog", "--text-encoder", str(te_root), "--latents-out", str(lat3)]) == 0
    assert not torch.equal(torch.load(lat), torch.load(lat3)), "the prompt must reach the DiT"


def test_generate_model_dir_with_checkpoint_decodes_with_its_vae(tmp_path, model_root, sf_ckpt, capsys):
    from ropesp.decode.wan_vae import WanVAEDecoder

    mp4, lat = tmp_path / "v.mp4", tmp_path / "v.pt"
    argv = ["generate", "--model-dir", str(model_root), "--checkpoint", str(sf_ckpt), *SMALL]
    assert main([*argv, "--output", str(mp4), "--latents-out", str(lat)]) == 0
    assert "decoder: vae" in capsys.readouterr().err
    assert read_video_info(mp4) == (21, 64, 96)  # 4*6 - 3 frames, 8x the 8x12 latent

    # the DiT is the checkpoint's (transformer/ is a placeholder here): same latents as --checkpoint alone
    lat2 = tmp_path / "ckpt.pt"
    assert main(["generate", "--checkpoint", str(sf_ckpt), *SMALL, "--output", str(tmp_path / "p.mp4"),
                 "--latents-out", str(lat2)]) == 0  # fmt: skip
    latents = torch.load(lat)
    assert torch.equal(latents, torch.load(lat2))

    # the MP4 holds the VAE's frames (up to H.264/yuv420 loss on random-weight noise), not the preview's
    vae_frames = WanVAEDecoder.from_path(model_root / "vae").decode(latents)[0].numpy()
    preview_frames = _mp4_frames(tmp_path / "p.mp4")
    written = _mp4_frames(mp4)
    err_vae = np.abs(written.astype(float) - vae_frames).mean()
    err_preview = np.abs(written.astype(float) - preview_frames).mean()
    assert err_vae < 20 and err_vae < err_preview / 3, (err_vae, err_preview)


def test_generate_vae_flag_and_decoder_override(tmp_path, model_root, sf_ckpt, capsys):
    base = ["generate", "--checkpoint", str(sf_ckpt), "--latent-frames", "3", "--latent-height", "4",
            "--latent-width", "6"]  # fmt: skip
    assert main([*base, "--vae", str(model_root / "vae"), "--decode-device", "cpu",
                 "--output", str(tmp_path / "a.mp4")]) == 0  # fmt: skip
    assert "decoder: vae on cpu (overlapped with the DiT)" in capsys.readouterr().err
    assert read_video_info(tmp_path / "a.mp4") == (9, 32, 48)
    assert main([*base, "--model-dir", str(model_root), "--decoder", "preview",
                 "--output", str(tmp_path / "b.mp4")]) == 0  # fmt: skip
    assert "decoder: preview" in capsys.readouterr().err
    assert read_video_info(tmp_path / "b.mp4") == (9, 32, 48)


def _partial(model_root, tmp_path, *drop):
    dst = tmp_path / "partial"
    shutil.copytree(model_root, dst)
    for part in drop:
        shutil.rmtree(dst / part)
    return dst


@pytest.mark.parametrize(
    ("case", "flag", "message"),
    [
        ("prompt-without-encoder", "--prompt", "--prompt needs a text encoder: pass --text-encoder DIR"),
        (
            "decoder-vae-without-vae",
            "--decoder",
            "--decoder vae needs a Wan VAE: pass --vae (a diffusers vae/ directory or Wan2.1_VAE.pth) or --model-dir",
        ),
        ("vae-missing", "--vae", "--vae /nonexistent/vae does not exist"),
        ("text-encoder-without-prompt", "--text-encoder", "--text-encoder is only used with --prompt"),
        ("text-encoder-incomplete", "--text-encoder", "is incomplete"),
        ("text-encoder-width", "--model-dir", "gives 32-dim embeddings, but the model's text_dim is 4096"),
        ("model-dir-missing", "--model-dir", "--model-dir /nonexistent/wan does not exist"),
        ("model-dir-partial", "--model-dir", "is not a complete diffusers Wan2.1 directory"),
        ("model-dir-placeholder-transformer", "--model-dir", "(transformer/): cannot read checkpoint"),
    ],
)
def test_bad_media_input_gives_clear_error(case, flag, message, tmp_path, model_root, sf_ckpt, capsys):
    ckpt = ["--checkpoint", str(sf_ckpt)]
    argv = {
        "prompt-without-encoder": ["--preset", "tiny", "--prompt", "a cat"],
        "decoder-vae-without-vae": ["--decoder", "vae"],
        "vae-missing": ["--vae", "/nonexistent/vae"],
        "text-encoder-without-prompt": ["--text-encoder", str(model_root)],
        "text-encoder-incomplete": ["--prompt", "a cat", "--text-encoder", str(model_root / "vae")],
        "text-encoder-width": ["--prompt", "a cat", "--model-dir", str(model_root), *ckpt],
        "model-dir-missing": ["--model-dir", "/nonexistent/wan"],
        "model-dir-partial": ["--model-dir", str(_partial(model_root, tmp_path, "vae")), *ckpt],
        "model-dir-placeholder-transformer": ["--model-dir", str(model_root)],
    }[case]
    assert main(["generate", *argv, "--output", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ropesp: error: {flag}"), err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_prompt_and_prompt_embeds_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "a cat", "--prompt-embeds", str(tmp_path / "p.pt")])
    assert exc.value.code == 2
    assert "--prompt-embeds: not allowed with argument --prompt" in capsys.readouterr().err


def test_generate_two_ranks_rank0_decodes_on_its_decode_device(tmp_path, model_root, sf_ckpt, capfd):
    """--world-size 2 --decode-device: rank 0 decodes overlapped (its DiT thread issuing the collectives)
    while rank 1 runs serially; same latents as one rank, and the full video is written."""
    base = ["generate", "--checkpoint", str(sf_ckpt), "--latent-frames", "6", "--latent-height", "4",
            "--latent-width", "6", "--vae", str(model_root / "vae")]  # fmt: skip
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    assert main([*base, "--output", str(tmp_path / "a.mp4"), "--latents-out", str(one)]) == 0
    assert main([*base, "--world-size", "2", "--decode-device", "cpu", "--output", str(tmp_path / "b.mp4"),
                 "--latents-out", str(two)]) == 0  # fmt: skip
    assert "decoder: vae on cpu (overlapped with the DiT)" in capfd.readouterr().err  # from the rank process
    torch.testing.assert_close(torch.load(two), torch.load(one), rtol=1e-5, atol=1e-5)
    assert read_video_info(tmp_path / "b.mp4") == (21, 32, 48)
