import pytest
import torch

from ropesp.errors import ConfigError
from ropesp.runtime.sampler import FlowSchedule
from ropesp.settings import SamplerConfig


def test_shift5_warped_timesteps():
    ts = FlowSchedule(SamplerConfig(shift=5.0)).timesteps
    torch.testing.assert_close(ts, torch.tensor([1000.0, 937.5, 833.3333, 625.0]), rtol=0, atol=1e-3)


def test_shift8_warped_timesteps():
    ts = FlowSchedule(SamplerConfig(shift=8.0)).timesteps
    torch.testing.assert_close(ts, torch.tensor([1000.0, 960.0, 888.8889, 727.2727]), rtol=0, atol=1e-3)


def test_sigma_lookup_and_x0():
    sched = FlowSchedule(SamplerConfig())
    t = sched.timesteps[1]
    assert sched.sigma(t) == pytest.approx(0.9375)
    assert sched.step_sigmas == [sched.sigma(t) for t in sched.timesteps]
    x, v = torch.randn(1, 3, 4, 2, 2), torch.randn(1, 3, 4, 2, 2)
    x0 = sched.to_x0(x, v, sched.sigma(t))
    torch.testing.assert_close(x0, (x.double() - 0.9375 * v.double()).float(), rtol=0, atol=0)


@pytest.mark.parametrize("shift", [5.0, 8.0, 1.0, 3.3])
def test_host_float_sigma_matches_the_reference_float32_tensor_math(shift):
    """The reference computes with float32 sigma tensors; the sampler uses host floats (no device
    copies). Both must give bit-identical results for every step of the schedule."""
    sched = FlowSchedule(SamplerConfig(shift=shift, steps=(1000, 900, 750, 500, 250, 10)))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 5, 6, generator=g), torch.randn(2, 3, 4, 5, 6, generator=g)
    for t in sched.timesteps:
        idx = torch.argmin((sched.all_timesteps[None, :] - t.reshape(1, 1)).abs(), dim=1)
        sigma_t = sched.sigmas[idx].reshape(-1, 1, 1, 1, 1)  # float32 tensor, as upstream
        reference = (1 - sigma_t) * x0 + sigma_t * eps
        assert torch.equal(sched.add_noise(x0, eps, sched.sigma(t)), reference)
        ref_x0 = (x0.double() - sigma_t.double() * eps.double()).to(torch.float32)
        assert torch.equal(sched.to_x0(x0, eps, sched.sigma(t)), ref_x0)


@pytest.mark.parametrize(
    "steps",
    [(1000, 1000), (1000, 1200), (0, 500), (250, 500), ()],
)
def test_bad_steps_are_refused(steps):
    with pytest.raises(ConfigError, match="steps"):
        SamplerConfig(steps=steps)


def test_chunk_sizes():
    assert SamplerConfig().chunk_sizes(21) == [3] * 7
    assert SamplerConfig(independent_first_frame=True).chunk_sizes(7) == [1, 3, 3]
    with pytest.raises(ConfigError, match="does not tile into chunks of --chunk-frames 3"):
        SamplerConfig().chunk_sizes(8)
    with pytest.raises(
        ConfigError,
        match=r"after a 1-frame first chunk \(--independent-first-frame\): valid lengths are 1, 13, 25",
    ):
        SamplerConfig(independent_first_frame=True).chunk_sizes(6)
