"""`ropesp generate` end to end on the embedded default, and its bad-input messages."""

import subprocess
import sys

import pytest
import torch

from ropesp.cli import main
from ropesp.demo import has_default_weights
from ropesp.video import read_video_info


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "ropesp.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(not has_default_weights(), reason="the demo weights are not trained into this tree yet")
def test_generate_embedded_default_writes_mp4_and_latents(tmp_path):
    out, lat = tmp_path / "v.mp4", tmp_path / "l.pt"
    proc = run_cli("generate", "--output", str(out), "--latents-out", str(lat))
    assert proc.returncode == 0, proc.stderr
    assert (
        "embedded demo model" in proc.stderr and "'a red square moving right' (demo encoder)" in proc.stderr
    )
    assert "time to first chunk" in proc.stderr and "FPS" in proc.stderr
    frames, height, width = read_video_info(out)
    assert (frames, height, width) == (33, 192, 192)  # 9 latent frames -> 4*9-3 video frames, 24*8 px
    latents = torch.load(lat)
    assert latents.shape == (1, 9, 16, 24, 24) and latents.dtype == torch.float32
    assert torch.isfinite(latents).all()


def test_random_weight_presets_stay_available_by_name(tmp_path):
    proc = run_cli("generate", "--preset", "tiny", "--output", str(tmp_path / "v.mp4"))
    assert proc.returncode == 0, proc.stderr
    assert "running the 'tiny' preset on seeded random weights" in proc.stderr
    assert read_video_info(tmp_path / "v.mp4") == (33, 128, 128)


def test_generate_is_reproducible_and_follows_flags(tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    common = [
        "generate",
        "--preset",
        "tiny",
        "--latent-height",
        "8",
        "--latent-width",
        "12",
        "--frames",
        "9",
        "--seed",
        "4",
        "--output",
        str(tmp_path / "x.mp4"),
        "--overwrite",
    ]
    assert main([*common, "--latents-out", str(a)]) == 0
    assert main([*common, "--latents-out", str(b), "--steps", "1000,500", "--shift", "8"]) == 0
    la, lb = torch.load(a), torch.load(b)
    assert la.shape == (1, 3, 16, 8, 12)
    assert not torch.allclose(la, lb), "--steps/--shift must change the result"
    assert main([*common, "--latents-out", str(b)]) == 0
    assert torch.equal(la, torch.load(b))


def test_prompt_embeds_files(tmp_path, tiny_cfg):
    from safetensors.torch import save_file

    emb = torch.randn(7, tiny_cfg.text_dim)
    torch.save(emb, tmp_path / "p.pt")
    save_file({"anything": emb[None]}, str(tmp_path / "p.safetensors"))
    outs = []
    for name in ("p.pt", "p.safetensors"):
        lat = tmp_path / f"{name}.lat.pt"
        assert (
            main(
                [
                    "generate",
                    "--preset",
                    "tiny",
                    "--frames",
                    "9",
                    "--prompt-embeds",
                    str(tmp_path / name),
                    "--latents-out",
                    str(lat),
                    "--output",
                    str(tmp_path / "x.mp4"),
                    "--overwrite",
                ]
            )
            == 0
        )
        outs.append(torch.load(lat))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "1000,1200"], "--steps 1000,1200: every step must be in 1..1000"),
        (["--steps", "750,1000"], "--steps 750,1000: steps must be strictly descending"),
        (["--context-noise", "1500"], "--context-noise 1500.0 must be a timestep in 0..1000"),
        (["--steps", "a,b"], "comma-separated integers"),
        (["--latent-height", "15"], "--latent-height 15 must be a positive multiple of the patch size 2"),
        (["--height", "120", "--width", "128"], "--height 120 must be a positive multiple of 16"),
        (
            ["--latent-frames", "8"],
            "does not tile into chunks of --chunk-frames 3: valid lengths are 9, 21, 33",
        ),
        (["--frames", "10"], "--frames 10 must be 4*k + 1"),
        (["--checkpoint", "/nonexistent/ckpt.pt"], "--checkpoint /nonexistent/ckpt.pt does not exist"),
        (["--checkpoint", __file__], f"--checkpoint {__file__}: unknown suffix; expected .pt"),
        (
            ["--latent-frames", "12", "--max-frames", "9"],
            "a video of 45 frames (12 latent) exceeds the KV cache of 9 latent frames: raise --max-frames to 12",
        ),
        (
            ["--local-attn-frames", "3", "--sink-frames", "1"],
            "--local-attn-frames 3 must be >= --sink-frames 1",
        ),
        (["--world-size", "8", "--ulysses-degree", "8"], "valid Ulysses degrees for world size 8: [1, 2, 4]"),
        (["--backend", "aoti"], "needs --engines"),
        (["--vae-compile"], "--vae-compile acts on the Wan VAE decoder: give --vae or --model-dir"),
        (["--vae-cudnn"], "--vae-cudnn acts on --vae-fast's decoder: pass --vae-fast too"),
        (
            ["--decode-device", "cuda:1"],
            "--decode-device acts on the Wan VAE decoder: give --vae or --model-dir",
        ),
    ],
)
def test_bad_input_gives_clear_error(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) if args[:2] == ["--steps", "a,b"] else _no_exit():
        code = main(["generate", "--preset", "tiny", *args, "--output", str(tmp_path / "x.mp4")])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_prompt_embeds_of_wrong_width(tmp_path, capsys):
    torch.save(torch.randn(5, 100), tmp_path / "bad.pt")
    assert (
        main(
            [
                "generate",
                "--preset",
                "tiny",
                "--prompt-embeds",
                str(tmp_path / "bad.pt"),
                "--output",
                str(tmp_path / "x.mp4"),
            ]
        )
        == 2
    )
    assert "expected [L, 4096]" in capsys.readouterr().err


def test_bad_input_exit_code_without_traceback():
    proc = run_cli("generate", "--latent-frames", "4")
    assert proc.returncode == 2
    assert "--chunk-frames 3" in proc.stderr and "Traceback" not in proc.stderr


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_generate_from_checkpoints_equals_random_default(tmp_path, tiny_model):
    from ropesp.model.checkpoint import save_checkpoint

    save_checkpoint(tiny_model, tmp_path / "sf.pt", "self-forcing")
    torch.save(tiny_model.state_dict(), tmp_path / "bare.pt")
    common = [
        "generate",
        "--preset",
        "tiny",
        "--frames",
        "9",
        "--output",
        str(tmp_path / "x.mp4"),
        "--overwrite",
    ]
    outs = []
    for ckpt in (None, "sf.pt", "bare.pt"):
        lat = tmp_path / f"{ckpt}.lat.pt"
        extra = ["--checkpoint", str(tmp_path / ckpt)] if ckpt else []
        assert main([*common, *extra, "--latents-out", str(lat)]) == 0
        outs.append(torch.load(lat))
    # the tiny preset runs on init_weights(seed 0), which tiny_model also is
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_checkpoint_config_mismatch_and_corrupt_file(tmp_path, tiny_model, capsys):
    torch.save(tiny_model.state_dict(), tmp_path / "bare.pt")
    assert main(["generate", "--checkpoint", str(tmp_path / "bare.pt"), "--preset", "wan2.1-1.3b"]) == 2
    assert "does not fit the model" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["generate", "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "bad.pt" in err
