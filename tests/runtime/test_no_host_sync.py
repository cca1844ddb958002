"""On a GPU, the chunk loop issues no host synchronization until the chunk's latents leave the device.

torch.cuda.set_sync_debug_mode("error") turns every synchronizing call (a pageable copy, .item(),
nonzero, ...) into an exception, which is how this proves it rather than by reading a profile.
"""

import pytest
import torch

from ropesp.runtime.pipeline import build_session
from ropesp.runtime.prompts import default_prompt_embeds
from ropesp.runtime.sampler import NoiseStream
from ropesp.settings import RunConfig

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (host-sync detection is CUDA's)")
def test_chunk_loop_has_no_host_sync():
    session = build_session(RunConfig.of(preset="tiny", latent_frames=6, device="cuda", dtype="bfloat16"))
    ex, sched = session.executor, session.schedule
    session.reset(default_prompt_embeds(ex.cfg), seed=0)
    session.generate()  # warm-up: kernels compiled, sinusoids cached on the device
    ex.reset()
    noise, shape = NoiseStream(0), (1, 3, 16, 16, 16)
    sigmas = sched.step_sigmas
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in (0, 3):
            x, *eps = [noise.draw(shape, "cuda") for _ in sigmas]  # the session's order: x, then eps
            for i, t in enumerate(sched.timesteps):
                x0 = sched.to_x0(x, ex.forward(x, t, start), sigmas[i])
                if i + 1 < len(sigmas):
                    x = sched.add_noise(x0, eps[i], sigmas[i + 1])
            ex.forward(x0, torch.tensor(0.0), start)  # the clean-context pass
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host memory)")
def test_cuda_noise_is_the_cpu_generators_numbers_drawn_without_a_host_sync():
    """Drawn into pinned memory and copied asynchronously; many draws in flight while the device is busy
    (the host cache must not reuse a block before its copy is done): the same numbers as the CPU draws."""
    shape = (1, 3, 16, 60, 104)
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            busy = busy @ busy / 64  # keeps the stream busy so the copies queue behind it
        gpu_noise = NoiseStream(5)
        on_gpu = [gpu_noise.draw(shape, "cuda") for _ in range(12)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_noise = NoiseStream(5)
    on_cpu = [cpu_noise.draw(shape) for _ in range(12)]
    for a, b in zip(on_gpu, on_cpu, strict=True):
        assert torch.equal(a.cpu(), b)
