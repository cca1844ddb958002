"""TAEHV's tiny Wan decoder (ropesp/decode/taehv.py): streaming gives the whole video's frames, against a
whole-video reference written out here; its checkpoints load in TAEHV's key layout; its flags are checked."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from ropesp.cli import main
from ropesp.decode.factory import make_decoder
from ropesp.decode.taehv import TAEHVDecoder, TinyWanDecoder, random_taehv
from ropesp.errors import CheckpointError, ConfigError, python_names
from ropesp.runtime.pipeline import check_taehv, resolve, stream_decoder
from ropesp.settings import RunConfig

FRAMES, ROWS, COLS = 7, 2, 3
"""A small latent video [1, 7, 16, 2, 3]: 25 frames of 16 x 24 pixels."""


@pytest.fixture(scope="module")
def model() -> TAEHVDecoder:
    return random_taehv(seed=0)


def _latents(seed: int, batch: int = 1, frames: int = FRAMES) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 16, ROWS, COLS, generator=g)  # [B, F, C, h, w], as the DiT makes them


def _stream(decoder: TinyWanDecoder, latents: torch.Tensor, sizes) -> list[torch.Tensor]:
    decoder.reset()
    bounds = [0, *itertools.accumulate(sizes)]
    return [decoder.decode_video(latents[:, a:b]) for a, b in itertools.pairwise(bounds)]


# --- an independent whole-video reference ---------------------------------------------------------
def reference_decode(state: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """TAEHV's whole-video (non-streaming) decode written out from the state dict, one frame at a time:
    latents [B, F, 16, h, w] -> frames [B, 1 + 4(F-1), 3, 8h, 8w] in [0, 1]. A MemBlock's memory is its
    input one step earlier (zeros before the first); a TGrow's output channels [kC, (k+1)C) are frame k;
    the first 3 frames are dropped."""

    def conv(x, i, name="", bias=True):
        weight = state[f"decoder.{i}.{name}weight"]
        b = state[f"decoder.{i}.{name}bias"] if bias else None
        return F.conv2d(x, weight, b, padding=weight.shape[-1] // 2)

    frames = [torch.tanh(x / 3) * 3 for x in latents.unbind(1)]  # F x [B, 16, h, w]
    frames = [F.relu(conv(x, 1)) for x in frames]
    for first, stride in ((3, 1), (9, 2), (15, 2)):
        for i in range(first, first + 3):
            memory = [torch.zeros_like(frames[0]), *frames[:-1]]
            out = []
            for x, past in zip(frames, memory):
                y = F.relu(conv(torch.cat([x, past], 1), i, "conv.0."))
                y = F.relu(conv(y, i, "conv.2."))
                out.append(F.relu(conv(y, i, "conv.4.") + x))
            frames = out
        frames = [F.interpolate(x, scale_factor=2, mode="nearest") for x in frames]
        grow = state[f"decoder.{first + 4}.conv.weight"]
        frames = [part for x in frames for part in F.conv2d(x, grow).chunk(stride, dim=1)]
        frames = [conv(x, first + 5, bias=False) for x in frames]
    frames = [conv(F.relu(x), 22).clamp(0, 1) for x in frames]
    return torch.stack(frames[3:], dim=1)


def test_taehv_matches_the_whole_video_reference(model):
    """Against the reference above (per-frame convolutions, a Python loop over time): the same fp32 ops
    on the same values, batched differently (the module convolves a chunk's frames as one batch), so
    equal up to the convolutions' summation order, which batching may change on some CPUs."""
    latents = _latents(1, batch=2)
    expected = reference_decode(model.state_dict(), latents)
    assert expected.shape == (2, 1 + 4 * (FRAMES - 1), 3, 8 * ROWS, 8 * COLS)
    assert 0.2 < expected.mean() < 0.8 and expected.std() > 0.05  # neither black, saturated nor flat
    got = torch.cat(_stream(TinyWanDecoder(model), latents, (1, 3, 3)), dim=1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


CHUNK_ATOL = 1e-5
"""Chunked against whole-video decode: the same fp32 operations on the same values, but the convolutions
see batches of another size (a chunk's frames), and oneDNN picks its algorithm, hence its summation
order, by shape (a [1, 512, 2, 3] input convolved alone differs from the same one in a batch of 12 by
~1e-7 relative; batches of 3 and 12 agree here). Measured ~4e-7 on frames in [0, 1]; a lost carry
changes frames by > 1e-2 (below)."""


@pytest.mark.parametrize("sizes", [(1, 3, 3), (3, 3, 1), (2, 2, 2, 1), (1, 1, 1, 1, 1, 1, 1)])
def test_taehv_chunked_equals_whole_video(model, sizes):
    """Each MemBlock carries its last input across chunks: any chunking gives the frames of one pass."""
    latents = _latents(2)
    decoder = TinyWanDecoder(model)
    whole = decoder.decode_video(latents)
    chunks = _stream(decoder, latents, sizes)
    assert [c.shape[1] for c in chunks] == [4 * sizes[0] - 3, *(4 * s for s in sizes[1:])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, atol=CHUNK_ATOL, rtol=0)


def test_taehv_carried_state_matters(model):
    """The tolerance above has teeth: a chunk decoded without the stream's carried state (a fresh stream,
    whose MemBlocks see zeros before it) differs from the same chunk in the stream by far more."""
    latents = _latents(2)
    in_stream = _stream(TinyWanDecoder(model), latents, (1, 3))[1]  # [1, 12, 3, H, W]
    fresh = TinyWanDecoder(model).decode_video(latents[:, 1:4])  # [1, 9, ...]: its first 3 trimmed
    assert (in_stream[:, 3:] - fresh).abs().max() > 1e-2


@pytest.mark.parametrize("frames", [1, 2, 5])
def test_taehv_frame_counts_and_uint8_frames(model, frames):
    decoder = TinyWanDecoder(model)
    latents = _latents(3, batch=2, frames=frames)
    video = decoder.decode_video(latents)
    assert video.shape == (2, 1 + 4 * (frames - 1), 3, 8 * ROWS, 8 * COLS)
    decoder.reset()
    got = decoder.decode(latents)
    assert got.dtype == torch.uint8 and got.device.type == "cpu"
    assert got.shape == (2, 1 + 4 * (frames - 1), 8 * ROWS, 8 * COLS, 3)  # [B, N, H, W, 3]
    expected = (video * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    assert torch.equal(got, expected)
    assert int(got.max()) - int(got.min()) > 16  # frames, not one grey
    assert decoder.decode(latents[:, :1]).shape[1] == 4  # a later chunk: 4 frames per latent frame


def test_taehv_refuses_other_latent_shapes(model):
    decoder = TinyWanDecoder(model)
    for shape in ((1, 3, 48, ROWS, COLS), (1, 0, 16, ROWS, COLS), (3, 16, ROWS, COLS)):
        with pytest.raises(ValueError, match=r"\[B, F, 16, h, w\]"):
            decoder.decode(torch.zeros(shape))


def test_taehv_forks_interleaved_equal_alone(model):
    decoder = TinyWanDecoder(model)
    a, b = _latents(4), _latents(5)
    alone_a = _stream(decoder.fork(), a, (1, 3, 3))
    alone_b = _stream(decoder.fork(), b, (1, 3, 3))
    fork_a, fork_b = decoder.fork(), decoder.fork()
    assert fork_a.model is fork_b.model is decoder.model  # the weights shared
    for (lo, hi), ea, eb in zip(((0, 1), (1, 4), (4, 7)), alone_a, alone_b):
        assert torch.equal(fork_a.decode_video(a[:, lo:hi]), ea)
        assert torch.equal(fork_b.decode_video(b[:, lo:hi]), eb)


# --- checkpoints ----------------------------------------------------------------------------------
def taehv_file_state(model: TAEHVDecoder) -> dict[str, torch.Tensor]:
    """A full TAEHV state dict as taew2_1 files hold it: the encoder's tensors too, and the first TGrow
    (time upscaling off in this decoder) stored with 2x the output channels, the model's the last half."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(9)
    state["encoder.0.weight"] = torch.randn(64, 3, 3, 3, generator=g)
    state["encoder.0.bias"] = torch.randn(64, generator=g)
    state["encoder.2.conv.weight"] = torch.randn(64, 64, 1, 1, generator=g)
    grow = state["decoder.7.conv.weight"]  # [256, 256, 1, 1]
    state["decoder.7.conv.weight"] = torch.cat([torch.randn(grow.shape, generator=g), grow])
    return state


def _save(state: dict[str, torch.Tensor], path) -> None:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("name", ["taew2_1.pth", "taew2_1.safetensors"])
def test_taehv_checkpoint_round_trip(model, tmp_path, name):
    path = tmp_path / name
    _save(taehv_file_state(model), path)
    latents = _latents(6)
    expected = TinyWanDecoder(model).decode(latents)
    loaded = TinyWanDecoder.from_path(path)
    assert torch.equal(loaded.decode(latents), expected)
    assert loaded.model.decoder[7].conv.weight.shape == (256, 256, 1, 1)
    built = make_decoder(None, "cpu", taehv=str(path))  # the entry points' one way
    assert isinstance(built, TinyWanDecoder) and torch.equal(built.decode(latents), expected)
    assert next(built.model.parameters()).dtype == torch.float32  # fp32 off CUDA


def test_taehv_random_is_seeded_and_leaves_the_global_rng(model):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = TinyWanDecoder.random(seed=0)
    assert torch.rand(1) == before
    assert all(torch.equal(p, q) for p, q in zip(again.model.parameters(), model.parameters()))
    other = TinyWanDecoder.random(seed=1)
    assert not torch.equal(other.model.decoder[1].weight, model.decoder[1].weight)


def _bad_files(tmp_path, model):
    state = taehv_file_state(model)
    cases = {
        "missing.pth": None,
        "text.pth": b"not a checkpoint",
        "text.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{nope}",
        "pickle.pth": {"made": datetime.date(2025, 1, 1)},
        "list.pth": {"weights": [1, 2, 3]},
        "encoder-only.pth": {k: v for k, v in state.items() if k.startswith("encoder.")},
        "missing-key.safetensors": {k: v for k, v in state.items() if k != "decoder.22.bias"},
        "taew2_2-like.pth": {**state, "decoder.1.weight": torch.zeros(256, 48, 3, 3)},
        "wrong-shape.pth": {**state, "decoder.8.weight": torch.zeros(128, 256, 1, 1)},
    }
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif name in ("pickle.pth", "list.pth"):
            torch.save(content, path)
        elif content is not None:
            _save(content, path)
        yield path


def test_taehv_bad_files_give_checkpoint_errors_naming_the_file(model, tmp_path):
    messages = {}
    for path in [*_bad_files(tmp_path, model), tmp_path]:
        with pytest.raises(CheckpointError) as err:
            TinyWanDecoder.from_path(path)
        assert str(path) in str(err.value)
        messages[path.name] = str(err.value)
    assert "does not exist" in messages["missing.pth"]
    assert "is a directory" in messages[tmp_path.name]
    assert "could not be read as a torch.save file" in messages["text.pth"]
    assert "could not be read as a safetensors file" in messages["text.safetensors"]
    assert "not a file of plain tensors" in messages["pickle.pth"]
    assert "is not a state dict of tensors ('weights': list)" in messages["list.pth"]
    assert "holds no decoder.* tensors" in messages["encoder-only.pth"]
    assert "decoder.22.bias" in messages["missing-key.safetensors"]
    assert "decodes 48 latent channels" in messages["taew2_2-like.pth"]
    assert (
        "not taew2_1's decoder" in messages["wrong-shape.pth"]
        and "decoder.8.weight" in messages["wrong-shape.pth"]
    )


# --- settings and entry points --------------------------------------------------------------------
TINY = ["--preset", "tiny", "--latent-height", "4", "--latent-width", "4", "--frames", "9"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--taehv", "random", "--decoder", "preview"], "--taehv is for --decoder taehv"),
        (["--taehv", "random", "--decoder", "none"], "--taehv is for --decoder taehv"),
        (
            ["--decoder", "taehv"],
            "--decoder taehv needs --taehv: a taew2_1 .pth or .safetensors file, or random",
        ),
        (
            ["--taehv", "random", "--vae", "x"],
            "--vae and --taehv each name a decoder: pick one with --decoder vae or --decoder taehv",
        ),
        (
            ["--taehv", "random", "--vae-fast"],
            "--vae-fast acts on the Wan VAE decoder, not on --taehv's tiny one",
        ),
        (
            ["--decoder", "taehv", "--taehv", "random", "--vae-compile"],
            "--vae-compile acts on the Wan VAE decoder, not on --taehv's tiny one",
        ),
        (
            ["--taehv", "random", "--vae-fast", "--vae-cudnn"],
            "--vae-fast acts on the Wan VAE decoder, not on --taehv's tiny one",
        ),
        (
            ["--taehv", "random", "--decode-device", "cuda:1"],
            "--decode-device acts on the Wan VAE decoder, not on --taehv's tiny one",
        ),
        (
            ["--taehv", "/nonexistent/taew2_1.pth"],
            "--taehv /nonexistent/taew2_1.pth does not exist: give the TAEHV project's taew2_1.pth or "
            "taew2_1.safetensors file, or --taehv random",
        ),
    ],
)
def test_taehv_flag_contradictions_exit_2_in_one_line(args, message, capsys, tmp_path):
    assert main(["generate", *TINY, *args, "--output", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"ropesp: error: {message}"]
    assert not (tmp_path / "x.mp4").exists()


def test_taehv_settings_name_python_arguments_from_python():
    """ropesp.Pipeline's keywords: the same rules, naming the arguments as Python spells them."""
    with python_names(), pytest.raises(ConfigError) as err:
        RunConfig.of(taehv="random", vae="x")
    assert (
        str(err.value) == "vae and taehv each name a decoder: pick one with decoder='vae' or decoder='taehv'"
    )
    with (
        python_names(),
        pytest.raises(ConfigError, match=r"^vae_fast acts on the Wan VAE decoder, not on taehv's"),
    ):
        RunConfig.of(taehv="random", vae_fast=True)
    assert (
        RunConfig.of(taehv="random").decode.tiny
        and not RunConfig.of(taehv="random", decoder="vae").decode.tiny
    )


def test_taehv_needs_16_latent_channels(capsys, tmp_path):
    """A model whose latents are not Wan 2.1's 16 channels is refused before anything runs, by flag."""
    cfg = dataclasses.replace(resolve(RunConfig.of(preset="tiny")).model, in_dim=48, out_dim=48)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    args = ["--model-config", str(tmp_path / "config.json"), *TINY[2:], "--taehv", "random"]
    assert main(["generate", *args, "--output", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "ropesp: error: --taehv random: the tiny decoder (taew2_1) takes Wan 2.1's 16 latent channels; this "
        "model makes 48 (use --decoder preview or none)"
    ]
    with pytest.raises(ConfigError, match="this model makes 48"):
        check_taehv("random", 48)


def test_taehv_decoder_choice_through_the_shared_settings(model, tmp_path):
    """--taehv picks the decoder unless --decoder says otherwise; the resolved pipeline builds it (the
    path of generate, ropesp.Pipeline, the Triton model and the demo alike)."""
    path = tmp_path / "taew2_1.pth"
    _save(taehv_file_state(model), path)
    res = resolve(RunConfig.of(preset="tiny", taehv=str(path)))
    assert (res.decoder, res.taehv, res.vae) == ("taehv", str(path), None)
    decoder = stream_decoder(res, torch.device("cpu"))
    assert isinstance(decoder, TinyWanDecoder)
    latents = _latents(7)
    assert torch.equal(decoder.decode(latents), TinyWanDecoder(model).decode(latents))
    both = {"preset": "tiny", "taehv": str(path), "vae": str(tmp_path)}  # --decoder picks one
    chosen = resolve(RunConfig.of(decoder="taehv", **both))
    assert (chosen.decoder, chosen.taehv, chosen.vae) == ("taehv", str(path), None)
    if importlib.util.find_spec("diffusers") is not None:  # the vae extra
        chosen = resolve(RunConfig.of(decoder="vae", **both))
        assert (chosen.decoder, chosen.taehv, chosen.vae) == ("vae", None, str(tmp_path))
    (tmp_path / "bad.pth").write_bytes(b"nope")
    res = resolve(RunConfig.of(preset="tiny", taehv=str(tmp_path / "bad.pth")))
    with pytest.raises(CheckpointError, match=rf"^--taehv {tmp_path}/bad.pth could not be read as"):
        stream_decoder(res, torch.device("cpu"))


def test_generate_with_the_tiny_decoder_writes_its_frames(tmp_path, capsys):
    """End to end on the CPU: the tiny preset (16 latent channels) decoded by --taehv random."""
    from ropesp.video import read_video_info

    out = tmp_path / "v.mp4"
    assert main(["generate", *TINY, "--taehv", "random", "--output", str(out)]) == 0
    assert "decoder: taehv" in capsys.readouterr().err
    assert read_video_info(out) == (9, 32, 32)  # 3 latent frames -> 1 + 4 * 2; 4 latent rows -> 32 px


# --- GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16)")
def test_taehv_bf16_on_cuda_within_bf16_of_fp32():
    """make_decoder's CUDA default (bf16) against the same weights in fp32 (TF32 off), streamed 1-3-3
    over a 480p-shaped strip: bf16 rounds each of ~20 layers' activations to 8 bits of mantissa."""
    exact = TinyWanDecoder(random_taehv(torch.float32, "cuda", seed=0))
    fast = make_decoder(None, "cuda", taehv="random")
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    latents = torch.randn(1, FRAMES, 16, 60, 104, generator=torch.Generator().manual_seed(8))
    with torch.backends.cudnn.flags(allow_tf32=False):
        expected = torch.cat(_stream(exact, latents, (1, 3, 3)), dim=1).float()
    got = torch.cat(_stream(fast, latents, (1, 3, 3)), dim=1).float()
    err = (got - expected).abs()
    assert got.shape == expected.shape == (1, 25, 3, 480, 832)
    assert err.mean() < 1e-2 and err.max() < 0.15, (err.mean().item(), err.max().item())
