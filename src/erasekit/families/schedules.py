"""The two noise schedules of the families: DDPM/DDIM (ε or v prediction) and rectified flow (Euler).

Both follow one rollout convention (DESIGN.md §3 step 3): the state handed to the model sits at the
noise level of the time it is queried at. DDIM keeps the reference's query draw (uniform inside bin k)
with the state at the bin's grid point; flow matching has no reference, so it queries the grid point
itself, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler

from erasekit.families.base import Level, Schedule


class DDIMSchedule(Schedule):
    """DDIM with eta 0 on an S-step grid of a DDPM schedule (SD 1.x/2.x, SDXL); ε or v prediction."""

    def __init__(self, scheduler_config: Any, steps: int) -> None:
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(steps)
        self.steps = steps
        self.grid = [int(t) for t in self.scheduler.timesteps]
        self.alphas = self.scheduler.alphas_cumprod
        self.prediction = self.scheduler.config.prediction_type
        self.num_train = int(self.scheduler.config.num_train_timesteps)

    def draw(self, generator: torch.Generator) -> Level:
        """k uniform in 0..S-1, then the queried timestep uniform in bin k (the reference's two draws, in its order)."""
        k = int(torch.randint(self.steps, (1,), generator=generator))
        lo = round(k / self.steps * self.num_train)
        hi = round((k + 1) / self.steps * self.num_train)
        return self.level(k, int(torch.randint(lo, max(hi, lo + 1), (1,), generator=generator)))

    def level(self, k: int, t: float | None = None) -> Level:
        """Bin k: S - 1 - k steps from pure noise reach its grid point.

        The grid runs downwards from pure noise, so bin k (the k-th grid point counted upwards from the data) is
        S - 1 - k steps away. The reference's ldm sampler (``till_T = k``, ``t_start = -1``) stops two grid points
        lower, 40-59 timesteps less noisy than the queried t for S = 50; we take the exact level the query asks about.
        """
        if not 0 <= k < self.steps:
            raise ValueError(f"bin {k} is outside the {self.steps}-step grid")
        steps = self.steps - 1 - k
        grid_t = self.grid[steps]
        return Level(k=k, steps=steps, t=grid_t if t is None else t, grid_t=grid_t)

    def grid_time(self, i: int) -> torch.Tensor:
        """The DDPM timestep of grid point i."""
        return self.scheduler.timesteps[i]

    def step(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """diffusers' DDIM step (eta 0), which reads ε, v or x0 from the scheduler config."""
        return self.scheduler.step(out, self.scheduler.timesteps[i], x).prev_sample

    def to_x0(self, x_t: torch.Tensor, out: torch.Tensor, level: Level) -> torch.Tensor:
        """x0 with ᾱ of the grid point (the reference's ``ddim_alphas[k]``)."""
        a = self.alphas[int(level.grid_t)].to(x_t.device, x_t.dtype)
        if self.prediction == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * out
        if self.prediction == "sample":
            return out
        return (x_t - (1 - a).sqrt() * out) / a.sqrt()

    def noised(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DDPM training: t ~ U{0..T-1}, x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε; the target is ε (or v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0)."""
        t = torch.randint(self.num_train, (len(x0),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        a = self.alphas[t].to(x0).view(-1, *[1] * (x0.dim() - 1))
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if self.prediction == "v_prediction" else eps
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t.to(x0.device), target

    def noised_at(self, x0: torch.Tensor, u: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`noised` at t = floor(u T) (clamped to T - 1) with noise ``eps``."""
        t = (u * self.num_train).long().clamp(max=self.num_train - 1)
        a = self.alphas[t].to(x0).view(-1, *[1] * (x0.dim() - 1))
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if self.prediction == "v_prediction" else eps
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, t.to(x0.device), target

    def noise_level(self, grid_t: float) -> float:
        """1 - ᾱ."""
        return float(1 - self.alphas[int(grid_t)])


class FlowSchedule(Schedule):
    """Rectified flow x_σ = (1 - σ) x0 + σ ε sampled with Euler steps on a σ grid (SD3, FLUX.1).

    ``sigmas`` are the S grid points from pure noise down (the pipeline's own, shift included) and the
    terminal 0; the model's time input is 1000 σ (families rescale it to what their transformer takes).
    """

    def __init__(self, sigmas: Sequence[float], num_train: int = 1000) -> None:
        self.sigmas = [float(s) for s in sigmas]
        if len(self.sigmas) < 2 or self.sigmas[-1] != 0.0:
            raise ValueError("the σ grid needs at least one point and the terminal 0")
        self.steps = len(self.sigmas) - 1
        self.num_train = num_train

    def draw(self, generator: torch.Generator) -> Level:
        """k uniform in 0..S-1; queried at its grid point's own time."""
        return self.level(int(torch.randint(self.steps, (1,), generator=generator)))

    def level(self, k: int, t: float | None = None) -> Level:
        """Bin k (counted from the data): S - 1 - k Euler steps from pure noise."""
        if not 0 <= k < self.steps:
            raise ValueError(f"bin {k} is outside the {self.steps}-step grid")
        steps = self.steps - 1 - k
        grid_t = self.sigmas[steps] * self.num_train
        return Level(k=k, steps=steps, t=grid_t if t is None else t, grid_t=grid_t)

    def grid_time(self, i: int) -> torch.Tensor:
        """1000 σ_i."""
        return torch.tensor(self.sigmas[i] * self.num_train)

    def step(self, out: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Euler: x + (σ_{i+1} - σ_i) v."""
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * out

    def to_x0(self, x_t: torch.Tensor, out: torch.Tensor, level: Level) -> torch.Tensor:
        """x0 = x_σ - σ v (v = ε - x0)."""
        return x_t - (level.grid_t / self.num_train) * out

    def noised(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flow-matching training: σ ~ U(0, 1), x_σ = (1 - σ) x0 + σ ε; the target velocity is ε - x0."""
        sigma = torch.rand(len(x0), generator=generator)
        eps = torch.randn(x0.shape, generator=generator).to(x0)
        s = sigma.to(x0).view(-1, *[1] * (x0.dim() - 1))
        return (1 - s) * x0 + s * eps, (sigma * self.num_train).to(x0.device), eps - x0

    def noised_at(self, x0: torch.Tensor, u: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`noised` at σ = u with noise ``eps``."""
        s = u.to(x0).view(-1, *[1] * (x0.dim() - 1))
        return (1 - s) * x0 + s * eps, (u * self.num_train).to(x0.device), eps - x0

    def noise_level(self, grid_t: float) -> float:
        """σ² / (σ² + (1 - σ)²): the noise share of the state's variance for unit-variance data."""
        s = grid_t / self.num_train
        return s * s / (s * s + (1 - s) ** 2)
