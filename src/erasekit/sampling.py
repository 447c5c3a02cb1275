"""DDIM rollouts to an intermediate x_t with CFG (the shared expensive step), x0 maps, and image generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

from erasekit.families.base import Pipeline

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_scheduler(pipe: Pipeline, steps: int) -> DDIMScheduler:
    """A private DDIM scheduler with the pipeline's noise schedule, set to ``steps`` steps (eta 0)."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def unet_eps(unet: torch.nn.Module) -> EpsFn:
    """Wrap a UNet2DConditionModel as eps(x, t, text_embeddings)."""

    def eps(x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=emb).sample

    return eps


@torch.no_grad()
def rollout(
    eps_fn: EpsFn,
    scheduler: Any,
    start: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    n_steps: int,
    guidance: float,
) -> torch.Tensor:
    """Run the first ``n_steps`` DDIM steps (eta 0) from ``start`` with CFG; one batched forward per step.

    Methods pass ``Level.steps`` (see :func:`grid_steps`), never a bin index: the two run in opposite directions.

    ``cond`` is (B, 77, d); ``start`` is (1 or B, C, H, W). Every row of the batch shares the noise.
    """
    return rollout_states(eps_fn, scheduler, start, cond, uncond, [n_steps], guidance)[0]


@torch.no_grad()
def rollout_states(
    eps_fn: EpsFn,
    scheduler: Any,
    start: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    n_steps: Sequence[int],
    guidance: float,
) -> list[torch.Tensor]:
    """The states after each of ``n_steps`` DDIM steps of one rollout (run once, to the largest count), in that order."""
    b = cond.shape[0]
    x = start.expand(b, *start.shape[1:]).clone()
    emb = torch.cat([uncond.expand(b, *uncond.shape[1:]), cond])
    states: dict[int, torch.Tensor] = {0: x}
    for i, t in enumerate(scheduler.timesteps[: max(n_steps, default=0)]):
        out = eps_fn(torch.cat([x, x]), t.expand(2 * b), emb)
        e_un, e_c = out.chunk(2)
        x = scheduler.step(e_un + guidance * (e_c - e_un), t, x).prev_sample
        states[i + 1] = x
    return [states[n] for n in n_steps]


@dataclass(frozen=True)
class Level:
    """One rollout point of the reference's convention (DESIGN.md §3 step 3).

    ``k`` is drawn uniform in 0..S-1; ``t`` is the DDPM timestep the UNet is queried at, uniform in
    [kT/S, (k+1)T/S); the DDIM state handed to it is the one at grid point ``grid_t``, inside that same bin,
    reached by ``steps`` DDIM steps from pure noise; the x0 map uses ``alpha_bar`` of that grid point
    (the reference's ``ddim_alphas[k]``), not of ``t``.
    """

    k: int
    steps: int
    t: int
    grid_t: int


def grid_steps(scheduler: Any, k: int) -> tuple[int, int]:
    """(DDIM steps from pure noise, grid timestep) that leave x_t at the noise level of bin ``k``.

    The grid (``scheduler.timesteps``) runs downwards from pure noise; after n steps the state sits at the n-th
    grid point, so bin k (the k-th grid point counted upwards from the data) is S - 1 - k steps away. The
    reference's ldm sampler (``till_T = k``, ``t_start = -1``) stops two grid points lower, 40-59 timesteps
    less noisy than the queried t for S = 50; we take the exact level the query asks about.
    """
    grid = [int(t) for t in scheduler.timesteps]
    if not 0 <= k < len(grid):
        raise ValueError(f"bin {k} is outside the {len(grid)}-step DDIM grid")
    return len(grid) - 1 - k, grid[len(grid) - 1 - k]


def draw_level(scheduler: Any, generator: torch.Generator) -> Level:
    """Draw k uniform in 0..S-1 and the DDPM timestep queried for it (the reference's two draws, in its order)."""
    n = len(scheduler.timesteps)
    k = int(torch.randint(n, (1,), generator=generator))
    t = ddpm_timestep(k, n, generator, scheduler.config.num_train_timesteps)
    steps, grid_t = grid_steps(scheduler, k)
    return Level(k=k, steps=steps, t=t, grid_t=grid_t)


def ddpm_timestep(k: int, ddim_steps: int, generator: torch.Generator, num_train: int = 1000) -> int:
    """The DDPM timestep the reference queries in bin k: uniform in [k/S*T, (k+1)/S*T)."""
    lo = round(k / ddim_steps * num_train)
    hi = round((k + 1) / ddim_steps * num_train)
    return int(torch.randint(lo, max(hi, lo + 1), (1,), generator=generator))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - a) eps) / sqrt(a): the loss space of EAP (an (1-a)/a-weighted eps MSE)."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


@torch.no_grad()
def generate(
    pipe: Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Images (uint8 N x H x W x 3) for prompts with one seed each; the same seed gives the same image."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    from erasekit.families import family_of

    family = family_of(pipe)
    if family.name != "sd":  # the other families sample through their own pipeline, one seed per image
        images = family.generate(pipe, prompts, seeds, steps, guidance)
        if progress:
            progress(len(prompts))
        return images
    pipe.set_progress_bar_config(disable=True)
    device = pipe.unet.device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        latents = torch.stack([
            torch.randn(
                (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size),
                generator=g,
            )
            for g in gens
        ]).to(device=device, dtype=pipe.unet.dtype)
        images = pipe(
            prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="np"
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        if progress:
            progress(len(chunk))
    return np.concatenate(out)
