"""Overlapped decode: the DiT runs in a producer thread while the iterator decodes; same results as serial."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from zero_flow import ZeroFlowExecutor

from ropesp.config import VideoGeometry
from ropesp.decode import PreviewDecoder
from ropesp.runtime.pipeline import build_session
from ropesp.runtime.session import StreamSession
from ropesp.settings import RunConfig, SamplerConfig


class SlowExecutor(ZeroFlowExecutor):
    """Each forward sleeps, counts itself and may raise on a chosen call."""

    def __init__(self, delay_s: float = 0.0, fail_at: int | None = None):
        self.delay_s, self.fail_at = delay_s, fail_at
        self.calls = 0
        self.threads: set[str] = set()

    def reset(self):
        self.calls = 0

    def forward(self, x, t, start_frame):
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and self.calls == self.fail_at:
            raise ValueError(f"executor failed at forward {self.calls}")
        self.calls += 1
        time.sleep(self.delay_s)
        return torch.zeros_like(x)


def _session(executor, frames=9, decoder=None, overlap=True):
    return StreamSession(
        executor,
        SamplerConfig(),
        VideoGeometry(4, 4),
        frames,
        decoder or PreviewDecoder(),
        overlap_decode=overlap,
    )


def _run(session, prompt, seed=3):
    session.reset(prompt, seed=seed)
    return list(session)


def _assert_same(a, b):
    assert [c.index for c in a] == [c.index for c in b]
    assert [c.start_frame for c in a] == [c.start_frame for c in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.latents, y.latents)
        assert torch.equal(x.frames, y.frames)


def test_overlap_default_only_on_cuda_with_a_decoder():
    assert not _session(SlowExecutor(), overlap=None).overlapped  # CPU executor
    assert _session(SlowExecutor(), overlap=True).overlapped
    no_decoder = StreamSession(SlowExecutor(), SamplerConfig(), VideoGeometry(4, 4), 3, overlap_decode=True)
    assert not no_decoder.overlapped  # nothing to overlap with


def test_overlap_default_is_single_rank_only():
    ex = SlowExecutor()
    ex.device = torch.device("cuda")  # only the default's decision is tested: nothing runs
    assert _session(ex, overlap=None).overlapped
    ex.world_size = 2
    assert not _session(ex, overlap=None).overlapped
    assert _session(ex, overlap=True).overlapped


def test_overlapped_equals_serial_tiny_dit_preview(prompt):
    torch.set_num_threads(1)
    session = build_session(
        RunConfig.of(preset="tiny", latent_frames=6, latent_height=8, latent_width=8, device="cpu"),
        decoder=PreviewDecoder(),
    )
    session.overlap_decode = False
    serial = _run(session, prompt)
    session.overlap_decode = True
    overlapped = _run(session, prompt)
    assert session.producer is not None and session.producer.name == "ropesp-dit"
    assert not session.producer.is_alive()
    _assert_same(serial, overlapped)
    assert [c.frames.shape[1] for c in overlapped] == [9, 12]


def test_overlapped_equals_serial_tiny_wan_vae(prompt):
    pytest.importorskip("diffusers")
    import helpers_media

    from ropesp.decode.wan_vae import WanVAEDecoder

    torch.set_num_threads(1)
    decoder = WanVAEDecoder(helpers_media.make_tiny_wan_vae())
    session = build_session(
        RunConfig.of(preset="tiny", latent_frames=6, latent_height=4, latent_width=6, device="cpu"),
        decoder=decoder,
    )
    session.overlap_decode = False
    serial = _run(session, prompt)
    session.overlap_decode = True
    overlapped = _run(session, prompt)
    _assert_same(serial, overlapped)
    assert [tuple(c.frames.shape) for c in overlapped] == [(1, 9, 32, 48, 3), (1, 12, 32, 48, 3)]


def test_decode_runs_while_the_dit_computes_the_next_chunk():
    executor = SlowExecutor(delay_s=0.02)
    seen = []

    class SlowDecoder(PreviewDecoder):
        def decode(self, latents):
            before = executor.calls
            time.sleep(0.3)
            seen.append((before, executor.calls))
            return super().decode(latents)

    session = _session(executor, frames=6, decoder=SlowDecoder())
    chunks = _run(session, None)
    assert len(chunks) == 2
    assert executor.threads == {"ropesp-dit"}
    # chunk 0 (4 steps + the clean-context pass) is handed over after 5 forwards; chunk 1's 4 forwards
    # (about 0.1 s) all run while chunk 0 decodes (0.3 s)
    assert seen[0][0] < 9 and seen[0][1] == 9, seen


def test_executor_exception_surfaces_from_the_iterator():
    session = _session(SlowExecutor(fail_at=7), frames=9)  # fails in chunk 1 (5 forwards per chunk)
    session.reset(seed=0)
    it = iter(session)
    assert next(it).index == 0
    with pytest.raises(ValueError, match="executor failed at forward 7"):
        next(it)
    assert not session.producer.is_alive()


def test_closing_the_iterator_stops_the_producer():
    executor = SlowExecutor(delay_s=0.01)
    session = _session(executor, frames=60)  # 20 chunks, 100 forwards, about 1 s
    session.reset(seed=0)
    it = iter(session)
    assert next(it).index == 0
    it.close()
    assert not session.producer.is_alive()
    calls = executor.calls
    assert calls < 100, "the producer must stop before the end of the stream"
    time.sleep(0.05)
    assert executor.calls == calls


def test_decoder_error_and_reset_stop_the_producer():
    class FailingDecoder(PreviewDecoder):
        def decode(self, latents):
            raise RuntimeError("decoder broke")

    executor = SlowExecutor(delay_s=0.01)
    session = _session(executor, frames=60, decoder=FailingDecoder())
    session.reset(seed=0)
    with pytest.raises(RuntimeError, match="decoder broke"):
        list(session)
    assert not session.producer.is_alive() and executor.calls < 100

    session = _session(SlowExecutor(delay_s=0.01), frames=60)
    session.reset(seed=0)
    it = iter(session)
    next(it)
    producer = session.producer
    session.reset(seed=1)  # a new stream while the old one runs: the old producer is stopped first
    assert not producer.is_alive()
    assert len(list(session)) == 20


class _GpuConvDecoder(PreviewDecoder):
    """A conv-heavy stand-in for the Wan VAE on the GPU: its `device`, so it decodes on a stream there."""

    def __init__(self, device):
        super().__init__(device=device)
        g = torch.Generator().manual_seed(0)
        self.vae = torch.nn.Sequential(
            torch.nn.Conv2d(16, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 16, 3, padding=1)
        )
        with torch.no_grad():
            for p in self.vae.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        self.vae.to(device)

    def decode(self, latents):
        x = latents.to(next(self.vae.parameters()).device)
        b, f = x.shape[:2]
        with torch.no_grad():
            y = self.vae(x.flatten(0, 1)).view(b, f, *x.shape[2:])
        return super().decode(y.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapped_equals_serial_on_cuda_streams(prompt):
    session = build_session(
        RunConfig.of(preset="tiny", latent_frames=9, device="cuda", dtype="float32"),
        decoder=_GpuConvDecoder("cuda"),
    )
    assert session.overlapped  # the default on CUDA with a decoder
    overlapped = _run(session, prompt)
    assert {"dit:cuda:0", "decode:cuda:0"} <= set(session._streams)
    session.overlap_decode = False
    serial = _run(session, prompt)
    _assert_same(serial, overlapped)
    session.overlap_decode = None
    _assert_same(serial, _run(session, prompt))  # streams reused, state reset between streams


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (the decoder on its own)")
def test_wan_vae_on_its_own_gpu_equals_decoding_beside_the_dit(prompt):
    """DiT on cuda:0, Wan VAE on cuda:1 (`--decode-device cuda:1`), overlapped: the same frames as the
    VAE on the DiT's GPU (same latents from the host, same kernels on the same GPU model: bitwise)."""
    pytest.importorskip("diffusers")
    import copy

    import helpers_media

    from ropesp.decode.wan_vae import WanVAEDecoder

    vae = helpers_media.make_tiny_wan_vae()
    config = RunConfig.of(preset="tiny", latent_frames=6, latent_height=4, latent_width=6, device="cuda")
    runs = []
    for where in ("cuda:0", "cuda:1"):
        decoder = WanVAEDecoder(copy.deepcopy(vae).to(where))
        assert next(decoder.vae.parameters()).device == torch.device(where)
        session = build_session(config, decoder=decoder, overlap_decode=True)
        runs.append(_run(session, prompt))
    _assert_same(*runs)


@pytest.mark.parametrize("overlap", [False, True])
def test_early_first_frame_hands_frame_zero_over_apart_with_the_same_frames(prompt, overlap):
    """early_first_frame: the first chunk comes as latent frame 0 (one video frame) and then the rest, both
    with index 0; every later chunk is whole, and the frames and latents are the stream's own."""
    torch.set_num_threads(1)
    config = RunConfig.of(preset="tiny", latent_frames=6, latent_height=8, latent_width=8, device="cpu")
    session = build_session(config, decoder=PreviewDecoder())
    session.overlap_decode = overlap
    whole = _run(session, prompt)
    session.early_first_frame = True
    pieces = _run(session, prompt)
    assert [(c.index, c.start_frame, c.frames.shape[1]) for c in pieces] == [(0, 0, 1), (0, 1, 8), (1, 3, 12)]
    assert torch.equal(torch.cat([c.latents for c in pieces], 1), torch.cat([c.latents for c in whole], 1))
    assert torch.equal(torch.cat([c.frames for c in pieces], 1), torch.cat([c.frames for c in whole], 1))
    assert pieces[0].elapsed_ms <= pieces[1].elapsed_ms
    assert pieces[1].dit_ms == 0.0 and pieces[0].dit_ms > 0.0  # the chunk's DiT time is counted once


def test_early_first_frame_wan_vae_decodes_frame_zero_alone_to_the_same_frames(prompt):
    """The Wan VAE carries its causal state frame by frame: latent frame 0 alone, then frames 1-2, give
    the bytes of the three decoded at once."""
    pytest.importorskip("diffusers")
    import helpers_media

    from ropesp.decode.wan_vae import WanVAEDecoder

    torch.set_num_threads(1)
    config = RunConfig.of(preset="tiny", latent_frames=6, latent_height=4, latent_width=6, device="cpu")
    session = build_session(config, decoder=WanVAEDecoder(helpers_media.make_tiny_wan_vae()))
    session.overlap_decode = False
    whole = _run(session, prompt)
    session.early_first_frame = True
    pieces = _run(session, prompt)
    assert [c.frames.shape[1] for c in pieces] == [1, 8, 12]
    assert torch.equal(torch.cat([c.frames for c in pieces], 1), torch.cat([c.frames for c in whole], 1))
