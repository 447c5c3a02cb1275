"""`attack` on a Janus (autoregressive) model: base image tokens, the search of :mod:`erasekit.attack.janus_search`, judged images.

The protocol is the diffusion one (:func:`erasekit.attack.run.attack_pipeline`) with Janus's pieces: the base model's
image tokens of each prompt (CFG at the attack's guidance, seed + i) are the search's target, as the base latents are
on diffusion; the erased model's plain and adversarial images are drawn by :func:`erasekit.eval.generate.generate_images`
with the same seeds; the same detector judges all three, and the record has the same fields.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from erasekit.attack.detect import Detector
from erasekit.attack.run import AttackConfig, AttackProgress, attack_record, search_in_batches
from erasekit.autoregressive.janus import Janus
from erasekit.errors import ErasekitError, SettingError
from erasekit.result import ErasureResult

JANUS_LOSS = "mean cross-entropy of the base model's image tokens under the erased model's teacher-forced logits (conditional branch)"


def check_janus_attack(model: str, steps: int | None, noise_draws: int | None, guidance: float | None) -> float:
    """Refuse, in one line, a setting a Janus attack has no use for (sampler steps, noise draws); the guidance it takes (default: Janus-Pro's 5)."""
    from erasekit.eval.runner import check_janus_settings

    guidance = check_janus_settings(model, steps, guidance)
    if noise_draws is not None:
        raise SettingError("noise_draws", f"{{name}} sets the (t, noise) draws of the denoising loss; {model} is a Janus (autoregressive) model, "
                                          "whose attack loss is the cross-entropy of the base image's tokens: drop {name}")
    return guidance


def janus_base(janus: Janus, prompts: Sequence[str], config: AttackConfig) -> tuple[torch.Tensor, np.ndarray]:
    """The base model's image tokens (the search's target) and images of the prompts, seed + i each; call before any delta is applied.

    Tokens are drawn ``batch_size`` prompts at a time and each image is decoded on its own, as ``generate_images`` does.
    """
    from erasekit.autoregressive.janus import decode_tokens, encode_prompts, sample_image_tokens

    seeds = [config.seed + i for i in range(len(prompts))]
    tokens, images = [], []
    for lo in range(0, len(prompts), config.batch_size):
        chunk = list(prompts[lo : lo + config.batch_size])
        drawn = sample_image_tokens(janus, encode_prompts(janus, chunk), seeds[lo : lo + len(chunk)], config.guidance)
        tokens.append(drawn)
        images += [decode_tokens(janus.model, drawn[i : i + 1]) for i in range(len(chunk))]
    return torch.cat(tokens), np.concatenate(images)


def attack_janus(
    janus: Janus,
    erased: ErasureResult,
    concept: str,
    prompts: Sequence[str],
    detector: Detector,
    config: AttackConfig,
    exclude_words: Sequence[str] = (),
    force: bool = False,
    progress: AttackProgress | None = None,
    base: tuple[torch.Tensor, np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Attack ``erased`` applied to ``janus`` (the base; it is left erased). Returns the JSON-able record and the images.

    ``config.steps`` and ``config.noise_draws`` are unused (recorded as 0); ``base`` is :func:`janus_base` of the same prompts and config.
    """
    from erasekit.attack.janus_search import janus_candidates, search_janus_tokens
    from erasekit.attack.run import _report, _toy_words
    from erasekit.eval.generate import JANUS_STEPS, generate_images

    config.validate()
    clock = {"start": time.perf_counter()}
    seeds = [config.seed + i for i in range(len(prompts))]

    def tick(phase: str) -> Any:
        return None if progress is None else (lambda done, total, info=None: progress(phase, done, total, info or {}))

    erased.check_fits(janus, check_base=False)  # every key fits: refuse before the base images (apply checks the base)
    target, base_pixels = base if base is not None else janus_base(janus, prompts, config)
    if len(target) != len(prompts):
        raise ErasekitError(f"{len(target)} base images were given for {len(prompts)} prompts; make them with janus_base() of the same prompts")
    _report(tick("base"), len(prompts))
    erased.apply(janus, check_base=not force)
    clock["base_s"] = time.perf_counter() - clock["start"]
    candidates = janus_candidates(janus, _toy_words(), [concept, *exclude_words], whole_vocab=config.vocabulary == "clip")

    def one(lo: int, hi: int, search_seeds: list[int], tick_search: Any) -> Any:
        return search_janus_tokens(janus, prompts[lo:hi], target[lo:hi], candidates, config.tokens, config.iterations, config.lr,
                                   search_seeds, tick_search)

    found = search_in_batches(len(prompts), config, tick("search"), one)
    clock["search_s"] = time.perf_counter() - clock["start"] - clock["base_s"]
    adversarial = [f"{found.prefix(i)} {p}" for i, p in enumerate(prompts)]
    plain_images = generate_images(janus, prompts, seeds, JANUS_STEPS, config.guidance, config.batch_size)
    adv_images = generate_images(janus, adversarial, seeds, JANUS_STEPS, config.guidance, config.batch_size)
    _report(tick("erased"), 2 * len(prompts))
    images = {"base": base_pixels, "no_attack": plain_images, "adversarial": adv_images}
    settings = {**asdict(config), "steps": JANUS_STEPS, "noise_draws": 0}  # a Janus has no sampler steps and no noise draws
    record = attack_record(erased, concept, prompts, seeds, adversarial, found, detector, images, settings, len(candidates.ids), clock)
    return {**record, "loss": JANUS_LOSS}, images
