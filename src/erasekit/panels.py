"""The image panels `erasekit generate` draws: a diffusion pipeline's (base, erased, SPM transport flipped) or a Janus model's.

A Janus model draws image tokens instead of denoising, so `generate`'s diffusion-only options are refused on it in one
line before anything loads (:func:`check_janus_options`). `erasekit erase` needs no path of its own: ``erasekit.erase``
takes a loaded Janus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.errors import ErasekitError

JANUS_GUIDANCE = 5.0  # Janus-Pro's CFG scale on image-token logits: `generate`'s default on a Janus model (7.5 is SD's)


def check_janus_options(model: str, image_prompt: Path | None, image_adapter: str | None, steps_given: bool) -> None:
    """Refuse, in one line, a `generate` option that has no meaning on a Janus model."""
    if image_prompt is not None or image_adapter is not None:
        raise ErasekitError(f"--image-prompt and --image-adapter prompt a diffusion pipeline through its IP-Adapter; {model} is a Janus "
                            "(autoregressive) model, which takes text prompts only: drop them")
    if steps_given:
        raise ErasekitError(f"--steps sets a diffusion sampler's steps; {model} is a Janus (autoregressive) model, which draws one "
                            "token per image position: drop --steps")


def janus_panels(
    janus: Any, prompts: Sequence[str], seeds: Sequence[int], guidance: float, results: Sequence[Any], tick: Callable[[int], None],
    tell: Callable[[str], None],
) -> list[tuple[str, np.ndarray]]:
    """The base images of ``prompts`` (one seed each) and, with a delta, the erased model's: ``(label, uint8 N x H x W x 3)`` panels.

    The delta is applied to ``janus`` in place (its fit is checked before the base images are drawn).
    """
    from erasekit.autoregressive.janus import generate

    def draw() -> np.ndarray:
        images = []
        for prompt, seed in zip(prompts, seeds):  # one image at a time, so the bar moves; a seed gives the same image in any batch
            images.append(generate(janus, [prompt], [seed], guidance=guidance))
            tick(1)
        return np.concatenate(images)

    panels = [("base", draw())]
    if results:
        tell("erased")
        for result in results:
            result.apply(janus, check_base=False)
        label = f"{'+'.join(dict.fromkeys(r.method for r in results))}: erased {', '.join(c for r in results for c in r.concepts)}"
        panels.append((label, draw()))
    return panels


def diffusion_panels(pipe: Any, prompts: list[str], seeds: list[int], results: list[Any], spm: bool, tick: Any, tell: Any, **sampling: Any) -> list[Any]:
    """The base images and, with deltas, the erased pipeline's (SPM adapters: transport as saved, then flipped) as grid panels."""
    from erasekit.sampling import generate as gen_images

    panels = [("base", gen_images(pipe, prompts, seeds, progress=tick, **sampling))]
    if results:
        tell("erased")
        for result in results:
            result.apply(pipe, check_base=False)
        label = f"{'+'.join(dict.fromkeys(r.method for r in results))}: erased {', '.join(c for r in results for c in r.concepts)}"
        on = results[0].hook.get("settings", {}).get("transport") if spm else None
        panels.append((f"{label} (transport {'on' if on else 'off'})" if spm else label, gen_images(pipe, prompts, seeds, progress=tick, **sampling)))
        if spm:
            from erasekit.hooks import remove
            from erasekit.methods.spm import with_transport

            remove(pipe)
            for result in results:
                with_transport(result, not on).apply(pipe, check_base=False)
            panels.append((f"{label} (transport {'off' if on else 'on'})", gen_images(pipe, prompts, seeds, progress=tick, **sampling)))
    return panels
