"""Few-step flow-matching sampler of Self-Forcing (MODEL_SPEC.md section 5) and the noise contract.

Numerics follow the reference exactly: the schedule is built in float32, x0 = x_t - sigma*v is
computed in float64 and cast back, re-noising is (1-sigma)*x0 + sigma*eps in float32.
Noise is drawn chunk by chunk from one CPU generator (DESIGN.md, Reproducibility), so a seed fixes
the output regardless of backend, world size or stream length.
"""

from __future__ import annotations

import torch

from ropesp.config import SamplerConfig

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

    def sigma(self, t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """Sigma of the schedule entry nearest to each timestep in t (the reference's argmin lookup)."""
        idx = torch.argmin((self.all_timesteps[None, :] - t.reshape(-1, 1)).abs(), dim=1)
        return self.sigmas[idx].to(device) if device is not None else self.sigmas[idx]

    def to_x0(self, x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 = x_t - sigma(t)*v in float64; x_t, flow: [B, F, C, H, W] fp32; t scalar tensor."""
        sigma = self.sigma(t, flow.device).double()
        return (x_t.double() - sigma * flow.double()).to(torch.float32)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(1 - sigma(t))*x0 + sigma(t)*eps, float32."""
        sigma = self.sigma(t, x0.device)
        return (1 - sigma) * x0 + sigma * eps


class NoiseStream:
    """Draws the stream's noise in the documented order from one seeded CPU generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32)
