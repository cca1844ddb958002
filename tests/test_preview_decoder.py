import pytest
import torch

from ropesp.decode.preview import (
    WAN21_LATENT_RGB,
    WAN21_LATENT_RGB_BIAS,
    PreviewDecoder,
    latent_to_rgb,
    to_uint8,
)


def test_preview_decodes_a_known_latent():
    # latent channel 2 = 1 everywhere -> rgb = coeff[2] + bias, mapped from [-1,1] to uint8
    lat = torch.zeros(1, 1, 16, 2, 3)
    lat[:, :, 2] = 1.0
    frames = PreviewDecoder().decode(lat)
    assert frames.shape == (1, 1, 16, 24, 3) and frames.dtype == torch.uint8
    rgb = torch.tensor(WAN21_LATENT_RGB[2]) + torch.tensor(WAN21_LATENT_RGB_BIAS)
    expected = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(frames[0, 0, 5, 7], expected)


def test_preview_interpolates_four_frames_per_latent_across_chunks():
    dec = PreviewDecoder()
    a = torch.full((1, 1, 16, 1, 1), -1.0)
    b = torch.full((1, 1, 16, 1, 1), 1.0)
    first = dec.decode(a)
    second = dec.decode(b)  # the carried state is chunk 1's last latent frame
    assert first.shape[1] == 1 and second.shape[1] == 4
    direct = PreviewDecoder().decode(torch.cat([a, b], dim=1))
    assert torch.equal(torch.cat([first, second], dim=1), direct)
    assert torch.equal(second[:, -1], PreviewDecoder().decode(b)[:, 0])


def test_21_latent_frames_give_81_video_frames_in_9_12_chunks():
    dec = PreviewDecoder(upscale=1)
    counts = [dec.decode(torch.randn(1, 3, 16, 2, 2)).shape[1] for _ in range(7)]
    assert counts == [9] + [12] * 6 and sum(counts) == 81


def test_upscaling_after_quantizing_gives_the_bytes_of_quantizing_the_upscaled_frames():
    """The decoder quantizes at latent resolution and repeats bytes; the straightforward order (repeat the
    float pixels 8x8, then quantize) must give identical frames."""
    lat = torch.randn(2, 3, 16, 5, 7, generator=torch.Generator().manual_seed(0)) * 2
    frames = PreviewDecoder().decode(lat)
    rgb = latent_to_rgb(lat)  # [B, F, h, w, 3]: frame 0, then 4 interpolated frames per latent frame
    floats = [rgb[:, 0]] + [
        torch.lerp(rgb[:, f - 1], rgb[:, f], (i + 1) / 4) for f in (1, 2) for i in range(4)
    ]
    upscaled = torch.stack(floats, dim=1).repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    assert frames.shape == (2, 9, 40, 56, 3) and frames.is_contiguous()
    assert torch.equal(frames, to_uint8(upscaled))


def test_preview_on_a_device_returns_cpu_frames_and_carries_its_state():
    lat = torch.randn(1, 6, 16, 3, 4, generator=torch.Generator().manual_seed(1))
    on_cpu = PreviewDecoder(device="cpu")
    chunks = [on_cpu.decode(lat[:, :3]), on_cpu.decode(lat[:, 3:])]
    assert all(c.device.type == "cpu" for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=1), PreviewDecoder().decode(lat))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_preview_on_the_gpu_matches_the_cpu_within_one_level():
    """Same float32 math on both; the GPU's fused multiply-adds may round a value that sits on a
    quantization boundary the other way, so one uint8 level apart at most, and rarely."""
    lat = torch.randn(1, 6, 16, 60, 104, generator=torch.Generator().manual_seed(2))
    gpu, cpu = PreviewDecoder(device="cuda"), PreviewDecoder()
    for part in (lat[:, :3], lat[:, 3:]):
        a, b = gpu.decode(part), cpu.decode(part)
        assert a.device.type == "cpu" and a.shape == b.shape
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
