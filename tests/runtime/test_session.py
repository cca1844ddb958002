import itertools

import pytest
import torch
from zero_flow import ZeroFlowExecutor

from ropesp.config import VideoGeometry
from ropesp.runtime.pipeline import build_session
from ropesp.runtime.sampler import FlowSchedule
from ropesp.runtime.session import StreamSession
from ropesp.settings import RunConfig, SamplerConfig


class RecordingExecutor(ZeroFlowExecutor):
    """Records its inputs: they expose the noise draw order exactly."""

    def __init__(self):
        self.calls = []

    def reset(self):
        self.calls.clear()

    def forward(self, x, t, start_frame):
        self.calls.append((x.clone(), float(t), start_frame))
        return torch.zeros_like(x)


@pytest.mark.parametrize(
    "sampler",
    [
        SamplerConfig(chunk_frames=3),
        SamplerConfig(chunk_frames=2),
        SamplerConfig(chunk_frames=3, independent_first_frame=True),
    ],
)
def test_noise_follows_documented_draw_order(sampler):
    frames = 7 if sampler.independent_first_frame else 6
    ex = RecordingExecutor()
    session = StreamSession(ex, sampler, VideoGeometry(4, 4), frames, skip_final_refresh=False)
    session.reset(seed=11)
    latents = session.generate()
    sched = FlowSchedule(sampler)
    g = torch.Generator("cpu").manual_seed(11)
    calls = iter(ex.calls)
    expected_chunks = []
    start = 0
    for n in sampler.chunk_sizes(frames):
        shape = (1, n, 16, 4, 4)
        x = torch.randn(shape, generator=g)
        for i, t in enumerate(sched.timesteps):
            got_x, got_t, got_start = next(calls)
            assert torch.equal(got_x, x) and got_t == float(t) and got_start == start
            if i + 1 < len(sched.timesteps):
                x = sched.add_noise(x, torch.randn(shape, generator=g), sched.sigma(sched.timesteps[i + 1]))
        clean_x, clean_t, _ = next(calls)  # the clean-context pass on x0 at t=0
        assert torch.equal(clean_x, x) and clean_t == 0.0
        expected_chunks.append(x)
        start += n
    assert torch.equal(latents, torch.cat(expected_chunks, dim=1))


def test_a_chunk_is_handed_out_before_its_clean_context_pass():
    """Time to a chunk = its denoising forwards; the clean pass runs before the next chunk's forwards."""
    ex = RecordingExecutor()
    session = StreamSession(ex, SamplerConfig(), VideoGeometry(4, 4), 6, skip_final_refresh=False)
    session.reset(seed=1)
    steps = len(FlowSchedule(SamplerConfig()).timesteps)
    seen = [len(ex.calls) for _ in session]  # forwards issued when each chunk arrives
    assert seen == [steps, 2 * steps + 1]
    assert len(ex.calls) == 2 * (steps + 1)  # every clean pass still runs (skip_final_refresh=False)


class GraphReplayingExecutor(RecordingExecutor):
    """Declares CUDA graph replays, as EagerExecutor/EngineExecutor do with cuda_graphs: the host runs ahead."""

    cuda_graphs = True


def test_with_cuda_graphs_the_clean_pass_is_queued_before_the_chunk_is_handed_out():
    """The order follows the configuration (the same on every rank of a group, whatever the timing)."""
    ex = GraphReplayingExecutor()
    session = StreamSession(ex, SamplerConfig(), VideoGeometry(4, 4), 9)
    session.reset(seed=1)
    steps = len(FlowSchedule(SamplerConfig()).timesteps)
    seen = [len(ex.calls) for _ in session]
    assert seen == [steps + 1, 2 * steps + 2, 3 * steps + 2]  # the last chunk has no clean pass
    reference = StreamSession(RecordingExecutor(), SamplerConfig(), VideoGeometry(4, 4), 9)
    reference.reset(seed=1)
    session.reset(seed=1)
    assert torch.equal(session.generate(), reference.generate())


class BusyCudaExecutor(GraphReplayingExecutor):
    """Flow = 0 on the GPU after ~tens of ms of queued matmuls: the host runs ahead of the device."""

    device = torch.device("cuda")

    def forward(self, x, t, start_frame):
        self.calls.append((None, float(t), start_frame))
        busy = torch.ones(2048, 2048, device="cuda")
        for _ in range(20):
            busy = busy @ busy / 2048
        return torch.zeros_like(x) * busy[0, 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a device that lags the host)")
def test_a_busy_device_gets_the_clean_pass_queued_before_the_chunk_is_handed_out():
    """With the device still computing a chunk, its clean-context pass is queued before the host waits
    for the latents (pinned copy + event), so the device never idles between chunks; the latents are
    still the chunk's own."""
    ex = BusyCudaExecutor()
    session = StreamSession(ex, SamplerConfig(), VideoGeometry(4, 4), 9, skip_final_refresh=True)
    session.reset(seed=1)
    steps = len(FlowSchedule(SamplerConfig()).timesteps)
    chunks = list(session)
    assert [c.latents.device.type for c in chunks] == ["cpu"] * 3
    # flow = 0: x0 is the chunk's last noised input; the host copy matches the serial CPU run's (fp32
    # re-noising on the GPU may contract to FMA: a few ulps)
    reference = StreamSession(RecordingExecutor(), SamplerConfig(), VideoGeometry(4, 4), 9)
    reference.reset(seed=1)
    got = torch.cat([c.latents for c in chunks], 1)
    torch.testing.assert_close(got, reference.generate(), rtol=1e-6, atol=1e-6)
    session.reset(seed=1)
    seen = [len(ex.calls) for _ in session]
    assert seen == [steps + 1, 2 * steps + 2, 3 * steps + 2]  # the last chunk has no clean pass


def test_same_seed_same_latents_and_reset_reuses_caches(prompt):
    session = build_session(RunConfig.of(preset="tiny", latent_frames=6, device="cpu"))
    k_buffer = session.executor.cache.k
    session.reset(prompt, seed=5)
    a = session.generate()
    session.reset(seed=5)
    b = session.generate()
    session.reset(seed=6)
    c = session.generate()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert session.executor.cache.k is k_buffer, "reset must not reallocate the KV cache"


def test_chunks_stream_in_order_with_preview_frames(prompt):
    from ropesp.decode import PreviewDecoder

    session = build_session(
        RunConfig.of(preset="tiny", latent_frames=9, device="cpu"), decoder=PreviewDecoder()
    )
    session.reset(prompt, seed=0)
    chunks = list(session)
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [c.start_frame for c in chunks] == [0, 3, 6]
    assert [c.frames.shape[1] for c in chunks] == [9, 12, 12]
    assert chunks[0].frames.shape[2:] == (128, 128, 3)
    assert all(a.elapsed_ms <= b.elapsed_ms for a, b in itertools.pairwise(chunks))


def test_iterating_without_reset_is_an_error():
    session = StreamSession(RecordingExecutor(), SamplerConfig(), VideoGeometry(4, 4), 3)
    with pytest.raises(RuntimeError, match="reset"):
        next(iter(session))
