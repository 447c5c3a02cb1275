"""Image generation with a pipeline of any family, one seed per image.

The rollouts, levels and x0 maps of training live with each family's schedule (``erasekit.families.schedules``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from erasekit.families.base import Pipeline


@torch.no_grad()
def generate(
    pipe: Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    image_prompt: Any = None,
) -> np.ndarray:
    """Images (uint8 N x H x W x 3) for prompts with one seed each; the same seed gives the same image.

    ``image_prompt``: one PIL image every prompt is also given through the pipeline's IP-Adapter (SD 1.x/2.x).
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    from erasekit.families import family_of

    family = family_of(pipe)
    extra: dict[str, Any] = {}
    if image_prompt is not None:
        from erasekit.image_prompt import require_adapter

        require_adapter(pipe, "--image-prompt")
        extra["ip_adapter_image"] = image_prompt
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
            prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="np", **extra
        ).images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        if progress:
            progress(len(chunk))
    return np.concatenate(out)
