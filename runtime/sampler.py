"""Few-step flow-matching sampler of Self-Forcing (docs/MODEL.md section 5) and the noise contract.

Numerics follow the reference exactly: the schedule is built in float32, x0 = x_t - sigma*v is
computed in float64 and cast back, re-noising is (1-sigma)*x0 + sigma*eps in float32.
Noise is drawn chunk by chunk from one CPU generator (docs/ARCHITECTURE.md, Contracts), so a seed fixes
the output regardless of backend, world size or stream length.
"""

from __future__ import annotations

import torch

from ropesp.settings import SamplerConfig

NUM_TRAIN_TIMESTEPS = 1000


class FlowSchedule:
    """Shifted flow-matching schedule; `timesteps` are the warped denoising steps (float32)."""

    def __init__(self, cfg: SamplerConfig) -> None:
        sigmas = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
        self.sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)  # [1000] float32
        self.all_timesteps = self.sigmas * NUM_TRAIN_TIMESTEPS
        ext = torch.cat([self.all_timesteps, torch.zeros(1)])
        self.timesteps = ext[NUM_TRAIN_TIMESTEPS - torch.tensor(cfg.steps, dtype=torch.long)]
        self.context_t = float(cfg.context_noise)

    def sigma(self, t: torch.Tensor | float) -> float:
        """Sigma of the schedule entry nearest to timestep t (the reference's argmin lookup).

        A host float (the float32 value, exactly): the sampler's arithmetic then needs no device copy.
        """
        t = torch.as_tensor(t, dtype=torch.float32).reshape(1, 1)
        return float(self.sigmas[torch.argmin((self.all_timesteps[None, :] - t).abs(), dim=1)])

    @property
    def step_sigmas(self) -> list[float]:
        """sigma of every denoising step, in order."""
        return [self.sigma(t) for t in self.timesteps]

    @staticmethod
    def to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
        """x0 = x_t - sigma*v in float64, cast to float32. x_t, flow: [B, F, C, H, W]."""
        return (x_t.double() - sigma * flow.double()).to(torch.float32)

    @staticmethod
    def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
        """(1 - sigma)*x0 + sigma*eps in float32 (sigma is a float32 value, so 1 - sigma rounds as
        the reference's float32 tensor arithmetic does)."""
        return (1 - sigma) * x0 + sigma * eps


class NoiseStream:
    """Draws the stream's noise in the documented order from one seeded CPU generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def draw(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The generator's next [shape] float32 standard normals, on device.

        For CUDA they are drawn straight into pinned host memory and copied without blocking the host:
        no pageable staging copy (~6 ms per 1.2 MB draw on the H200 host, 2026-11-29), and the host can
        go on while the copy runs. Same numbers as torch.randn(shape, generator=...) on the CPU."""
        device = torch.device(device)
        if device.type != "cuda":
            return torch.randn(shape, generator=self.generator, dtype=torch.float32)
        host = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        # the pinned block returns to PyTorch's host cache when `host` dies, and is reused only after
        # the copy recorded on it has finished
        return host.normal_(generator=self.generator).to(device, non_blocking=True)
