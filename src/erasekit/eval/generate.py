"""Cached generation: every image is stored as a PNG keyed by (model hash, prompt, seed, sampler settings).

A second evaluation of the same model regenerates nothing; the per-image seed makes every image
reproducible on its own. Files are written through a uniquely named temporary file and a rename, so
several processes may fill the same cache at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from erasekit.distributed import distributed
from erasekit.errors import ErasekitError
from erasekit.hooks import generation_hash
from erasekit.sampling import generate

CACHE_ENV = "ERASEKIT_CACHE"
__all__ = ["GenerationCache", "Generated", "SamplerSettings", "default_cache_dir", "distributed", "generate_cached", "generate_images", "image_key",
           "is_autoregressive", "sampler_settings"]
JANUS_STEPS = 0  # a Janus model has no sampler steps: its images are keyed (and recorded) with steps 0


def default_cache_dir() -> Path:
    """``$ERASEKIT_CACHE``, else ``~/.cache/erasekit/generations``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "erasekit" / "generations"


@dataclass(frozen=True)
class SamplerSettings:
    """Everything besides the prompt and seed that decides an image."""

    steps: int
    guidance: float
    height: int
    width: int


def image_key(model_hash: str, prompt: str, seed: int, settings: SamplerSettings) -> str:
    """SHA-256 of the model's generation hash (weights, and any hook on it), the prompt, the seed and the sampler settings."""
    record = {
        "model": model_hash, "prompt": prompt, "seed": int(seed), "steps": int(settings.steps),
        "guidance": float(settings.guidance), "height": int(settings.height), "width": int(settings.width), "sampler": "ddim",
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


class GenerationCache:
    """A folder of PNGs named by their key (two-level fan-out, like git's objects)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        """Where the image with ``key`` lives (whether or not it exists yet)."""
        return self.folder / key[:2] / f"{key}.png"

    def get(self, key: str) -> np.ndarray | None:
        """The cached image (uint8 H x W x 3), or None if absent or unreadable."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except OSError:
            return None  # a damaged file is regenerated and replaced

    def put(self, key: str, image: np.ndarray) -> Path:
        """Store ``image`` under ``key`` atomically; returns its path."""
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ErasekitError(f"cannot create the generation cache {self.folder}: {exc.strerror or exc}; pass another --cache-dir") from None
        from erasekit.atomic import save_png

        save_png(Image.fromarray(np.asarray(image, dtype=np.uint8)), path, what=f"to the generation cache {self.folder}")
        return path


def is_autoregressive(model: Any) -> bool:
    """Whether ``model`` is a loaded Janus (autoregressive) model rather than a diffusers pipeline."""
    from erasekit.autoregressive.janus import Janus

    return isinstance(model, Janus)


def sampler_settings(pipe: Any, steps: int, guidance: float) -> SamplerSettings:
    """The settings of images this model generates: a diffusers pipeline's (size from its UNet and VAE), or a Janus's (no steps)."""
    if is_autoregressive(pipe):
        from erasekit.autoregressive.janus import image_size

        side = image_size(pipe.model)
        return SamplerSettings(steps=JANUS_STEPS, guidance=float(guidance), height=side, width=side)
    from erasekit.families import family_of

    side = family_of(pipe).image_size(pipe)
    return SamplerSettings(steps=int(steps), guidance=float(guidance), height=side, width=side)


def generate_images(model: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float, batch_size: int) -> np.ndarray:
    """uint8 images (N x H x W x 3) of ``prompts``, one seed each, from a diffusers pipeline or a loaded Janus (the one dispatch on kind).

    A diffusers pipeline denoises for ``steps`` DDIM steps; a Janus draws its image tokens with CFG on their logits
    (``steps`` unused), ``batch_size`` prompts at a time, and decodes each image on its own: the VQ decoder's convolutions
    round differently by batch size, and a metric must not depend on it. Either way a seed gives the same image in any batch.
    """
    if is_autoregressive(model):
        from erasekit.autoregressive.janus import decode_tokens, encode_prompts, sample_image_tokens

        images = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            tokens = sample_image_tokens(model, encode_prompts(model, chunk), seeds[start : start + batch_size], guidance)
            images += [decode_tokens(model.model, tokens[i : i + 1]) for i in range(len(chunk))]
        return np.concatenate(images)
    return generate(model, prompts, seeds, steps=steps, guidance=guidance, batch_size=batch_size)


@dataclass(frozen=True)
class Generated:
    """Images in request order, their cache paths, and how many had to be generated."""

    images: np.ndarray
    paths: list[Path]
    generated: int


def generate_cached(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cache: GenerationCache,
    steps: int = 25,
    guidance: float | Sequence[float] = 7.5,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    model_hash: str | None = None,
) -> Generated:
    """Images for (prompt, seed) pairs, generating only those the cache lacks; ``guidance`` may be one per prompt.

    ``pipe`` is a diffusers pipeline (typed ``Any``: its components are set at run time) or a loaded Janus.

    Under `accelerate launch` the missing images' batches are dealt out to the processes (data-parallel), which share
    the cache folder (each key is written by one process); every process returns all images, identical to one process's
    with the same ``batch_size``. ``generated`` counts this process's share.
    """
    if len(prompts) != len(seeds):
        raise ErasekitError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
    scales = [float(guidance)] * len(prompts) if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
    if len(scales) != len(prompts):
        raise ErasekitError(f"{len(prompts)} prompts but {len(scales)} guidance scales")
    if batch_size < 1:
        raise ErasekitError(f"batch size must be at least 1, got {batch_size}")
    model_hash = model_hash or generation_hash(pipe)
    keys = [image_key(model_hash, p, s, sampler_settings(pipe, steps, g)) for p, s, g in zip(prompts, seeds, scales)]
    counts = Counter(keys)
    rank, world, barrier = distributed(cpu=pipe.device.type == "cpu")
    found = {key: cache.get(key) for key in counts}
    barrier()  # every process splits the work from the same view of the cache
    if progress and (cached := sum(found[k] is not None for k in keys)):
        progress(cached)
    # one job per missing key (a duplicated request is generated once), grouped by guidance scale
    todo: dict[float, dict[str, int]] = {}
    for i, key in enumerate(keys):
        if found[key] is None:
            todo.setdefault(scales[i], {}).setdefault(key, i)
    generated = 0
    # whole batches are dealt out (batch i to process i mod world), so every image is computed in the same batch as on
    # one process with the same batch_size: the images, hence the metrics, are identical bit for bit
    chunks = [(scale, order[start : start + batch_size]) for scale, jobs in todo.items()
              for order in [list(jobs.items())] for start in range(0, len(order), batch_size)]
    for scale, chunk in chunks[rank::world]:
        out = generate_images(pipe, [prompts[i] for _, i in chunk], [int(seeds[i]) for _, i in chunk], steps, scale, batch_size)
        for (key, _), img in zip(chunk, out):
            cache.put(key, img)
            found[key] = img
        generated += len(chunk)
        if progress:
            progress(sum(counts[key] for key, _ in chunk))
    barrier()
    for key in [k for k, img in found.items() if img is None]:
        found[key] = cache.get(key)  # written by another process
        if found[key] is None:
            raise ErasekitError(f"image {key[:12]} is missing from the cache {cache.folder} after generation; is it shared by every process?")
    return Generated(images=np.stack([found[k] for k in keys]), paths=[cache.path(k) for k in keys], generated=generated)  # type: ignore[misc]
