"""`ropesp bench` on the CPU: structure of the JSON and the plot, never speed."""

import importlib.util
import json

import pytest
import torch

from ropesp.cli import main


@pytest.mark.parametrize("world_size", [1, 2])
def test_bench_writes_json_and_plot(tmp_path, world_size):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(
        [
            "bench",
            "--latent-frames",
            "6",
            "--latent-height",
            "8",
            "--latent-width",
            "8",
            "--world-size",
            str(world_size),
            "--warmup",
            "1",
            "--repeat",
            "1",
            "--json",
            str(js),
            "--plot",
            str(png),
        ]
    )
    assert code == 0
    out = json.loads(js.read_text())
    expected = {"reference", "optimized"} | ({"paper-sp"} if world_size > 1 else set())
    assert set(out["results"]) == expected
    for name, row in out["results"].items():
        assert row["world_size"] == (1 if name == "reference" else world_size)
        assert len(row["chunk_ms"]) == 2 and all(v >= 0 for v in row["chunk_ms"])
        for key in ("first_chunk_ms", "first_frame_ms", "total_ms", "fps_dit", "fps_with_decode"):
            assert row[key] > 0, key
        assert 0 <= row["comm_share"] <= 1
        assert row["tflops_per_gpu"] > 0
        assert len(row["peak_gib_per_rank"]) == row["world_size"]
        # fp32: the configurations differ by RoPE formulation and collectives only (rounding, ~1e-6)
        assert row["latents_vs"]["config"] == next(iter(out["results"]))
        assert row["latents_vs"]["max_abs"] < 1e-4
    assert (out["results"]["optimized"]["comm_share"] > 0) == (world_size > 1)
    # overlapped decode (DiT on a producer thread per rank, collectives included) on any world size
    assert out["results"]["optimized"]["fps_with_decode_overlapped"] > 0
    for key in ("date", "card", "torch", "git_commit"):
        assert out["environment"][key]
    assert out["setup"]["video_frames"] == 21
    assert out["setup"]["flops_per_video"]["total"] > out["setup"]["flops_per_video"]["attention"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_no_decode_times_the_dit_only(tmp_path, capsys, monkeypatch):
    from ropesp.runtime.dist import Mapping

    reads, real = [], Mapping.from_env.__func__
    monkeypatch.setattr(Mapping, "from_env", classmethod(lambda cls, n=None: reads.append(n) or real(cls, n)))
    js = tmp_path / "b.json"
    args = ["bench", "--latent-frames", "3", "--latent-height", "8", "--latent-width", "8"]
    code = main([*args, "--configs", "optimized", "--repeat", "1", "--no-decode", "--json", str(js)])
    assert code == 0
    assert len(reads) == 1  # the rank environment, read once in the process
    row = json.loads(js.read_text())["results"]["optimized"]
    assert row["fps_dit"] > 0 and row["decoder"] is None
    assert row["first_frame_ms"] is None and row["fps_with_decode"] is None
    assert row["fps_with_decode_overlapped"] is None
    assert main([*args, "--no-decode", "--vae", "random"]) == 2
    assert "--no-decode" in capsys.readouterr().err
    configs = "optimized,optimized-graphs,compile"  # graphs are CUDA-only: on the CPU they run uncaptured
    code = main([*args, "--configs", configs, "--repeat", "1", "--no-decode", "--json", str(js)])
    assert code == 0
    rows = json.loads(js.read_text())["results"]
    assert list(rows) == configs.split(",") and all(r["fps_dit"] > 0 for r in rows.values())


def test_bench_compiled_needs_engines(capsys):
    assert main(["bench", "--configs", "optimized,compiled"]) == 2
    assert "needs --engines" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda:7", "--decode-device cuda:7: this machine has 0 visible CUDA GPU(s)"),
        ("xla:0", "--decode-device 'xla:0': only cpu and cuda devices are supported"),
        ("gpu-one", "--decode-device 'gpu-one' is not a device: use cpu, cuda or cuda:N"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="the messages name a machine without GPUs")
def test_bench_decode_device_is_checked_before_any_rank_starts(device, message, capsys, tmp_path):
    assert main(["bench", "--configs", "optimized", "--vae", str(tmp_path), "--decode-device", device]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_output_paths_are_checked_before_the_run(flag, capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    for path, why in (
        (tmp_path, "is a directory"),
        (tmp_path / "a-file" / "out", f"{tmp_path / 'a-file'} is a file, not a directory"),
    ):
        assert main(["bench", "--preset", "tiny", "--configs", "reference", flag, str(path)]) == 2
        captured = capsys.readouterr()
        assert f"{flag} {path}: {why}" in captured.err and "Traceback" not in captured.err
        assert "reference" not in captured.out  # no row: nothing was timed
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_bench_decode_device_needs_a_vae(capsys):
    assert main(["bench", "--configs", "optimized", "--decode-device", "cpu"]) == 2
    assert "--decode-device acts on the Wan VAE decoder: give --vae or --model-dir" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("cudnn") is not None, reason="nvidia-cudnn-frontend is installed"
)
def test_bench_vae_cudnn_names_its_extra(capsys):
    args = [
        "bench",
        "--configs",
        "optimized",
        "--vae",
        "random",
        "--vae-fast",
        "--vae-cudnn",
        "--preset",
        "tiny",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--vae-cudnn needs the [cudnn] extra (missing: cudnn)" in err and "Traceback" not in err


def test_bench_vae_compile_needs_a_vae(capsys):
    assert main(["bench", "--configs", "optimized", "--vae-compile"]) == 2
    assert "--vae-compile acts on the Wan VAE decoder: give --vae or --model-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra", [[], ["--world-size", "2", "--decode-device", "cpu"]], ids=["own-device", "rank0-decodes"]
)
def test_bench_times_the_wan_vae(tmp_path, extra):
    """Rank 0 decodes, on its own device or (--decode-device) on the device named, while the other ranks
    run the same videos without a decoder, in lock-step."""
    import helpers_media

    vae_dir = tmp_path / "vae"
    helpers_media.save_wan_vae_diffusers(helpers_media.make_tiny_wan_vae(), vae_dir)
    js = tmp_path / "b.json"
    code = main(
        [
            "bench",
            "--latent-frames",
            "3",
            "--latent-height",
            "8",
            "--latent-width",
            "8",
            "--configs",
            "optimized",
            "--warmup",
            "1",
            "--repeat",
            "1",
            "--vae",
            str(vae_dir),
            "--json",
            str(js),
            *extra,
        ]
    )
    assert code == 0
    row = json.loads(js.read_text())["results"]["optimized"]
    assert row["decoder"] == "wan-vae" and row["fps_with_decode"] > 0 and row["first_frame_ms"] > 0
    assert row["decode_device"] == "cpu" and row["fps_with_decode_overlapped"] > 0


def test_bench_times_the_tiny_decoder(tmp_path, capsys):
    """--taehv: the JSON's rows and the table's caption name the decoder timed; its contradictions are
    refused before any rank starts."""
    js = tmp_path / "b.json"
    args = ["bench", "--latent-frames", "3", "--latent-height", "4", "--latent-width", "4"]
    code = main([*args, "--configs", "optimized", "--repeat", "1", "--taehv", "random", "--json", str(js)])
    assert code == 0
    row = json.loads(js.read_text())["results"]["optimized"]
    assert row["decoder"] == "taehv" and row["fps_with_decode"] > 0 and row["first_frame_ms"] > 0
    assert "decoder of the +dec columns: taehv (--taehv random)" in capsys.readouterr().out
    for extra, message in (
        (["--vae", "random"], "--vae and --taehv: a bench run times one decoder; give one of them"),
        (["--vae-fast"], "--vae-fast acts on the Wan VAE decoder, not on --taehv's tiny one"),
        (["--no-decode"], "--taehv times decode; it cannot be combined with --no-decode"),
    ):
        assert main([*args, "--taehv", "random", *extra]) == 2
        assert capsys.readouterr().err.strip() == f"ropesp: error: {message}"
    assert main([*args, "--taehv", str(tmp_path / "nope.pth")]) == 2
    assert f"--taehv {tmp_path / 'nope.pth'} does not exist" in capsys.readouterr().err


def test_bench_names_the_wan_vae_it_cannot_read(tmp_path, capsys):
    """--vae: a missing path refused before any rank starts, an unreadable file named by its flag (as
    generate names it), one line each."""
    args = ["bench", "--latent-frames", "3", "--latent-height", "4", "--latent-width", "4", "--repeat", "1"]
    assert main([*args, "--vae", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == f"ropesp: error: --vae {tmp_path / 'nope'} does not exist (a diffusers vae/ directory or Wan2.1_VAE.pth)"
    )
    (tmp_path / "bad.pth").write_bytes(b"nope")
    assert main([*args, "--configs", "optimized", "--warmup", "0", "--vae", str(tmp_path / "bad.pth")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"ropesp: error: --vae {tmp_path / 'bad.pth'} could not be read")
        and "Traceback" not in err
    )


def test_bench_alone_times_rank0_by_itself(tmp_path, capsys):
    js = tmp_path / "b.json"
    args = ["bench", "--latent-frames", "6", "--latent-height", "8", "--latent-width", "8", "--no-decode"]
    code = main([*args, "--world-size", "2", "--alone", "--configs", "reference,optimized", "--repeat", "1"])
    assert code == 0 and "--alone: rank 0 of 2" in capsys.readouterr().out
    code = main(
        [*args, "--world-size", "4", "--alone", "--configs", "optimized", "--repeat", "1", "--json", str(js)]
    )
    assert code == 0
    out = json.loads(js.read_text())
    row = out["results"]["optimized"]
    assert out["setup"]["alone"] and out["setup"]["world_size"] == 4
    assert row["world_size"] == 4 and row["fps_dit"] > 0 and len(row["peak_gib_per_rank"]) == 1
    assert row["comm_share"] >= 0  # the stand-in collectives are timed like real ones (local copies)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--world-size P >= 2"),
        (["--world-size", "4", "--ring-degree", "2"], "pure Ulysses layout only"),
        (["--world-size", "2", "--vae", "random", "--decode-device", "cpu"], "no GPU of its own"),
    ],
)
def test_bench_alone_bad_options(extra, message, capsys):
    assert main(["bench", "--alone", *extra]) == 2
    assert message in capsys.readouterr().err


def test_bench_alone_is_refused_under_a_launcher(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["bench", "--alone", "--world-size", "2", "--no-decode"]) == 2
    assert "without torchrun" in capsys.readouterr().err


def test_bench_unknown_configs_are_named_as_typed(capsys):
    assert main(["bench", "--configs", "compile,nope,other"]) == 2
    err = capsys.readouterr().err
    assert "--configs nope,other: choose from reference, paper-sp, optimized" in err and "[" not in err
