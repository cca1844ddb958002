"""The fast streaming Wan VAE decoder gives the frames of today's decoder (bit for bit in fp32 on the CPU),
and every decoder's forks decode interleaved streams exactly as alone."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import helpers_media

from ropesp.decode.factory import WarmUp, make_decoder
from ropesp.decode.preview import PreviewDecoder
from ropesp.decode.wan_fast import FastWanDecoder
from ropesp.decode.wan_vae import WanVAEDecoder, load_wan_vae

LATENT_FRAMES, ROWS, COLS = 9, 4, 6
CHUNKS = ((0, 3), (3, 6), (6, 9))


@pytest.fixture(scope="module")
def vae():
    return helpers_media.make_tiny_wan_vae(seed=0)


def _latents(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, LATENT_FRAMES, 16, ROWS, COLS, generator=g)  # [B, F, C, h, w], normalized


@pytest.fixture(scope="module")
def latents():
    return _latents(1)


def _stream(decoder, latents, chunks=CHUNKS) -> list[torch.Tensor]:
    return [decoder.decode_video(latents[:, a:b]) for a, b in chunks]


@pytest.mark.parametrize("chunks", [CHUNKS, ((0, 1), (1, 5), (5, 9))], ids=["3-3-3", "1-4-4"])
def test_fast_decoder_equals_wan_vae_decoder_exactly(vae, latents, chunks):
    """Same fp32 ops on the same values (the caches in place instead of concatenated and padded): the
    frames are identical, chunk by chunk, including the first chunk's single first frame."""
    expected = _stream(WanVAEDecoder(vae), latents, chunks)
    got = _stream(FastWanDecoder(vae), latents, chunks)
    assert [g.shape for g in got] == [e.shape for e in expected]
    assert expected[0].std() > 0.05  # not a degenerate output
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_fast_decoder_uint8_frames_and_reset(vae, latents):
    reference, fast = WanVAEDecoder(vae), FastWanDecoder(vae)
    for a, b in CHUNKS:
        assert torch.equal(fast.decode(latents[:, a:b]), reference.decode(latents[:, a:b]))
    fast.reset()
    reference.reset()
    assert torch.equal(fast.decode(latents[:, :3]), reference.decode(latents[:, :3]))  # 9 frames again


def test_fast_decoder_rejects_a_new_size_mid_stream(vae, latents):
    fast = FastWanDecoder(vae)
    fast.decode_video(latents[:, :3])
    with pytest.raises(ValueError, match="reset"):
        fast.decode_video(torch.zeros(1, 3, 16, ROWS + 2, COLS))
    fast.reset()
    assert fast.decode_video(torch.zeros(1, 3, 16, ROWS + 2, COLS)).shape[2] == 9
    with pytest.raises(ValueError, match=r"\[B, F, 16, h, w\]"):
        fast.decode_video(torch.zeros(1, 3, 8, ROWS, COLS))


@pytest.mark.parametrize("make", [FastWanDecoder, WanVAEDecoder], ids=["fast", "wan"])
def test_forks_interleaved_equal_each_stream_alone(vae, make):
    """Two forks of a decoder mid-stream, chunks interleaved a1 b1 a2 b2 a3 b3: each fork gets exactly
    the frames of its stream decoded alone, the parent's stream goes on untouched, and a reset of one
    fork starts a new stream there only."""
    a, b = _latents(2), _latents(3)
    alone_a, alone_b = _stream(make(vae), a), _stream(make(vae), b)
    parent = make(vae)
    parent.decode_video(b[:, :3])
    fork_a, fork_b = parent.fork(), parent.fork()
    assert fork_a is not parent and fork_b is not fork_a
    for (lo, hi), expected_a, expected_b in zip(CHUNKS, alone_a, alone_b):
        torch.testing.assert_close(fork_a.decode_video(a[:, lo:hi]), expected_a, atol=0, rtol=0)
        torch.testing.assert_close(fork_b.decode_video(b[:, lo:hi]), expected_b, atol=0, rtol=0)
    torch.testing.assert_close(parent.decode_video(b[:, 3:6]), alone_b[1], atol=0, rtol=0)
    fork_b.reset()
    torch.testing.assert_close(fork_b.decode_video(a[:, :3]), alone_a[0], atol=0, rtol=0)
    assert fork_a.decode_video(a[:, :3]).shape == (1, 3, 12, 8 * ROWS, 8 * COLS)  # its stream goes on


def test_preview_fork_is_a_fresh_stream():
    a, b = _latents(2), _latents(3)
    parent = PreviewDecoder()
    first = parent.decode(a[:, :3])
    fork = parent.fork()
    assert torch.equal(fork.decode(b[:, :3]), PreviewDecoder().decode(b[:, :3]))  # 9 frames: its first
    alone = PreviewDecoder()
    alone.decode(a[:, :3])
    assert torch.equal(parent.decode(a[:, 3:6]), alone.decode(a[:, 3:6])) and first.shape[1] == 9


def test_fast_fork_shares_weights_and_workspace(vae, latents):
    fast = FastWanDecoder(vae)
    fork = fast.fork()
    assert fork.engine is fast.engine and fork.vae is fast.vae
    fast.decode_video(latents[:, :3])
    fork.decode_video(latents[:, :3])
    assert len(fast.engine.workspaces) == 1  # one set of buffers for both streams


def test_make_decoder_fast(vae, tmp_path, latents):
    path = helpers_media.save_wan_vae_diffusers(vae, tmp_path / "vae")
    decoder = make_decoder(str(path), "cpu", fast=True, warm_up=WarmUp(ROWS, COLS, 3))
    assert isinstance(decoder, FastWanDecoder) and decoder.device == torch.device("cpu")
    reference = WanVAEDecoder(load_wan_vae(path))
    assert torch.equal(decoder.decode(latents[:, :3]), reference.decode(latents[:, :3]))


def _gpu_decoders(vae):
    exact = WanVAEDecoder(copy.deepcopy(vae).to("cuda"), channels_last=False)
    eager = WanVAEDecoder(copy.deepcopy(vae).to("cuda", torch.bfloat16), channels_last=False)
    fast = FastWanDecoder(copy.deepcopy(vae).to("cuda", torch.bfloat16))
    return exact, eager, fast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, Triton, CUDA graphs)")
def test_fast_decoder_on_cuda_within_bf16_of_eager(vae, latents):
    """bf16 with the Triton passes, channels-last and CUDA graphs, against one fp32 decode: as close as
    the eager bf16 decoder (bounds as tests/decode/test_wan_vae.py's compiled test: the tiny random VAE's
    bf16 rounding alone reaches ~0.2), over two streams (the second replays the graphs)."""
    exact, eager, fast = _gpu_decoders(vae)
    chunks = [latents[:, a:b] for a, b in CHUNKS]
    with torch.backends.cudnn.flags(allow_tf32=False):
        expected = torch.cat([exact.decode_video(c) for c in chunks], dim=2)
    eager_err = (torch.cat([eager.decode_video(c) for c in chunks], dim=2) - expected).abs()
    assert fast.engine.cuda_graphs
    for _ in range(2):
        fast.reset()
        got = [fast.decode_video(c) for c in chunks]
        assert [g.shape[2] for g in got] == [9, 12, 12]
        err = (torch.cat(got, dim=2) - expected).abs()
        summary = f"fast max {err.max():.4f} mean {err.mean():.5f}; eager max {eager_err.max():.4f} mean {eager_err.mean():.5f}"
        assert err.mean() <= 1.5 * eager_err.mean() + 1e-3, summary
        assert err.max() <= 2 * eager_err.max() + 1e-2, summary
    assert set(fast.engine.workspaces[(1, ROWS, COLS)].graphs) == {True, False}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_fast_forks_interleaved_on_cuda_equal_alone(vae):
    """On the GPU too (graph replays, caches swapped by copies): bit for bit each stream alone."""
    fast = FastWanDecoder(copy.deepcopy(vae).to("cuda", torch.bfloat16))
    a, b = _latents(2), _latents(3)
    alone_a, alone_b = _stream(fast.fork(), a), _stream(fast.fork(), b)
    fork_a, fork_b = fast.fork(), fast.fork()
    for (lo, hi), ea, eb in zip(CHUNKS, alone_a, alone_b):
        assert torch.equal(fork_a.decode_video(a[:, lo:hi]), ea)
        assert torch.equal(fork_b.decode_video(b[:, lo:hi]), eb)


def test_biases_left_to_the_fused_passes_give_the_same_frames(vae, latents):
    """On CUDA the residual blocks' convolutions run without their biases and the next pass adds them
    (engine.fuse_bias); the same routing through the passes' references here. The bias is added after
    the convolution's rounding instead of inside it: fp32 rounding only (measured max 0.8-1.2e-5 on
    [-1, 1] pixels in three processes, 1.4e-5 with the Triton kernels in Triton's interpreter); 1e-4
    bounds it, while the norms' biases lost move pixels by 1.1."""
    expected = _stream(WanVAEDecoder(vae), latents)
    fast = FastWanDecoder(vae)
    fast.engine.fuse_bias = True
    for got, want in zip(_stream(fast, latents), expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
