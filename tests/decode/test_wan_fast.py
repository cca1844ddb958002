"""The fast streaming Wan VAE decoder gives the frames of today's decoder (bit for bit in fp32 on the CPU),
and every decoder's forks decode interleaved streams exactly as alone."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import helpers_media

from ropesp.decode import cudnn_conv
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


def _gpu_decoders(vae, cudnn_graphs: bool = False):
    exact = WanVAEDecoder(copy.deepcopy(vae).to("cuda"), channels_last=False)
    eager = WanVAEDecoder(copy.deepcopy(vae).to("cuda", torch.bfloat16), channels_last=False)
    fast = FastWanDecoder(copy.deepcopy(vae).to("cuda", torch.bfloat16), cudnn_graphs=cudnn_graphs)
    return exact, eager, fast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, Triton, CUDA graphs)")
@pytest.mark.parametrize(
    "cudnn_graphs",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.skipif(not cudnn_conv.available(), reason="needs nvidia-cudnn-frontend")
        ),
    ],
    ids=["torch-convs", "cudnn-graphs"],
)
def test_fast_decoder_on_cuda_within_bf16_of_eager(vae, latents, cudnn_graphs):
    """bf16 with the Triton passes, channels-last and CUDA graphs (and the convolutions as cuDNN graphs),
    against one fp32 decode: as close as the eager bf16 decoder (bounds as tests/decode/test_wan_vae.py's
    compiled test: the tiny random VAE's bf16 rounding alone reaches ~0.2), over two streams (the second
    replays the graphs)."""
    exact, eager, fast = _gpu_decoders(vae, cudnn_graphs)
    if cudnn_graphs:  # the graphs even where PyTorch's kernel would be faster at the tiny VAE's shapes
        fast.engine.run_conv = cudnn_conv.GraphConvs(torch.device("cuda"), keep_faster=False)
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
    if cudnn_graphs:  # cuDNN graphs ran (a 4-channel signature cuDNN refuses stays PyTorch's, named)
        convs = fast.engine.run_conv
        assert any(convs.plans.values()) and set(convs.refused) == {
            k for k, v in convs.plans.items() if v is None
        }


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


@pytest.mark.skipif(cudnn_conv.available(), reason="nvidia-cudnn-frontend is installed here")
def test_cudnn_graphs_without_the_package_name_it():
    with pytest.raises(ModuleNotFoundError, match=r"nvidia-cudnn-frontend.*ropesp\[cudnn\]"):
        cudnn_conv.GraphConvs(torch.device("cpu"))


def test_cudnn_graphs_stay_off_the_cpu(vae, latents):
    """On the CPU the decoder keeps PyTorch's convolutions (cuDNN graphs are CUDA-only): the same frames."""
    fast = FastWanDecoder(vae, cudnn_graphs=True)
    assert fast.engine.run_conv is cudnn_conv.torch_conv
    for got, want in zip(_stream(fast, latents), _stream(FastWanDecoder(vae), latents)):
        assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not cudnn_conv.available(), reason="needs nvidia-cudnn-frontend")
@pytest.mark.parametrize("spatial", [2, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_cudnn_graph_convolution_equals_torch_in_bf16_and_replays_in_a_cuda_graph(spatial, bias):
    """A view of a larger zero-bordered channels-last buffer (as the decoder's causal buffers are read):
    within bf16 rounding of PyTorch's convolution against fp32 (rel L2 <= 1.5x PyTorch's bf16 error +
    1e-3), and the same result replayed from a CUDA graph on new input values."""
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 64, 5, 18, 22) if spatial == 3 else (3, 64, 18, 22)
    fmt = torch.channels_last_3d if spatial == 3 else torch.channels_last
    buf = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16).contiguous(memory_format=fmt)
    x = buf[:, :, :4] if spatial == 3 else buf
    w = (torch.randn((32, 64, *[3] * spatial), device="cuda", generator=g) / 24).to(torch.bfloat16)
    w = w.contiguous(memory_format=fmt)
    b = torch.randn(32, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    convs = cudnn_conv.GraphConvs(torch.device("cuda"), keep_faster=False)
    with torch.backends.cudnn.flags(allow_tf32=False):
        exact = cudnn_conv.torch_conv(x.float(), w.float(), None if b is None else b.float())
    ours, theirs = convs(x, w, b), cudnn_conv.torch_conv(x, w, b)
    assert all(convs.plans.values()), convs.refused
    rel = (ours.float() - exact).norm() / exact.norm()
    assert rel <= 1.5 * (theirs.float() - exact).norm() / exact.norm() + 1e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = convs(x, w, b)
    buf.normal_(generator=g)
    graph.replay()
    torch.testing.assert_close(replayed, convs(x, w, b), atol=0, rtol=0)


def test_cudnn_descriptor_stride_packs_a_leading_dimension_of_one():
    """The decoder's causal buffers are read as views of their first frames: with one video the batch
    stride is the buffer's, which no element's address uses; cuDNN is told the packed one (as PyTorch's
    own descriptors do), and the view handed over has it too, on the same memory."""
    buf = torch.zeros(1, 6, 8, 3, 5).contiguous(memory_format=torch.channels_last_3d)
    x = buf[:, :, :3]
    assert x.stride()[0] == 8 * 3 * 5 * 6 and cudnn_conv.descriptor_stride(x) == (3 * 3 * 5 * 6, 1, 90, 30, 6)
    view = cudnn_conv.as_described(x)
    assert view.stride() == cudnn_conv.descriptor_stride(x) and view.data_ptr() == x.data_ptr()
    assert torch.equal(view, x)
    two = torch.zeros(2, 6, 8, 3, 5).contiguous(memory_format=torch.channels_last_3d)[:, :, :3]
    assert cudnn_conv.as_described(two) is two  # a real batch keeps its strides
    packed = torch.zeros(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert cudnn_conv.as_described(packed) is packed


def test_cudnn_plan_timing_gives_up_on_a_slow_first_call(monkeypatch):
    """A plan whose first call is over the limit is not timed again (some of cuDNN's plans take seconds a
    call at the decoder's shapes); one under it gets its repetitions, and the best of them counts."""
    calls = []

    def fake_event_ms(fn):
        fn()
        return times.pop(0)

    monkeypatch.setattr(cudnn_conv, "_event_ms", fake_event_ms)
    times = [900.0, 1.0, 1.0, 1.0]
    assert cudnn_conv._time_ms(lambda: calls.append(1), give_up_ms=10.0) == 900.0
    assert len(calls) == 1 and times == [1.0, 1.0, 1.0]
    times = [9.0, 3.0, 2.0, 2.5]
    assert cudnn_conv._time_ms(lambda: calls.append(1), give_up_ms=10.0) == 2.0
    assert len(calls) == 5 and not times
