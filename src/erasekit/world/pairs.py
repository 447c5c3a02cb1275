"""The look-alike-pair bar of `erasekit world check`: erasing one object hurts its designed partner most.

This is the shape of the EAP paper's Fig. 2 (erasing "nudity" hurts "naked", "women" most), and the
reason toy world v2 conditions its UNet on a frozen, contrastively trained text encoder. For each
designed pair (a, b): erase a with ESD-x (toy preset), generate every object's evaluation prompt with
the base and the erased model, and rank the other objects by the drop in the judge's probability of
their class. The pair meets the bar when b is among the three most affected *and* really affected: its drop
is at least ``MIN_DROP`` points. Without that floor, an erasure that leaves every other object untouched
would "rank" the partner by ties of ±0.1 points (seen on toy world v2: star's partner ranked 2nd with a
drop of -0.0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from erasekit.world.captions import object_prompt
from erasekit.world.judge import Judge, judge_images
from erasekit.world.vocab import load_vocab

PAIR_SEED, TOP = 4_000_000, 3
MIN_DROP = 5.0  # points of the judge's mean probability: less than losing one image of 16 outright (6.25)
Generate = Callable[[Any, list[str], list[int]], np.ndarray]  # (diffusers pipeline, prompts, seeds) -> uint8 images


def class_scores(pipe: Any, judge: Judge, generate: Generate, images_per_class: int) -> np.ndarray:
    """Per object, the judge's mean probability (%) of that object on images of its evaluation prompt (``pipe``: a diffusers pipeline)."""
    vocab = load_vocab()
    prompts = [object_prompt(o) for o in vocab.objects for _ in range(images_per_class)]
    seeds = [PAIR_SEED + i % images_per_class for i in range(len(prompts))]
    probs = judge_images(judge, generate(pipe, prompts, seeds))["object"]
    own = probs[np.arange(len(prompts)), np.repeat(np.arange(len(vocab.objects)), images_per_class)]
    return 100.0 * own.reshape(len(vocab.objects), images_per_class).mean(1)


def lookalike_pairs(
    pipe: Any, judge: Judge, generate: Generate, images_per_class: int = 16, iterations: int | None = None
) -> dict:
    """Erase the first object of every designed pair with ESD-x; where its partner ranks among the drops (``pipe``: a diffusers pipeline)."""
    base = class_scores(pipe, judge, generate, images_per_class)
    overrides: dict[str, Any] = {"iterations": iterations} if iterations else {}
    rows = [erase_and_rank(pipe, judge, generate, base, erased, partner, images_per_class, **overrides)
            for erased, partner in load_vocab().lookalike_pairs()]
    met = sum(r["met"] for r in rows)
    return {"pairs": rows, "met": met, "of": len(rows), "bar_met": met >= len(rows) - 1}


def erase_and_rank(
    pipe: Any, judge: Judge, generate: Generate, base: np.ndarray, erased: str, partner: str, images_per_class: int, **overrides: Any
) -> dict[str, Any]:
    """Erase ``erased`` with ESD-x (toy preset and ``overrides``), score every class against ``base``, rank the partner; ``pipe`` is left as it was."""
    from erasekit.api import erase

    result = erase(pipe, erased, method="esd-x", budget="toy", **overrides)
    original = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}
    try:
        after = class_scores(result.apply(pipe), judge, generate, images_per_class)
    finally:
        pipe.unet.load_state_dict(original)
    drops = {o: round(float(base[i] - after[i]), 2) for i, o in enumerate(load_vocab().objects)}  # ranked as reported
    return rank_partner(drops, erased, partner)


def rank_partner(drops: dict[str, float], erased: str, partner: str) -> dict[str, Any]:
    """One pair's row: the partner's rank among the other objects' drops, and whether it is a top-3, >= MIN_DROP drop."""
    others = sorted((o for o in drops if o != erased), key=lambda o: (-drops[o], o))
    rank = others.index(partner) + 1
    return {"erased": erased, "partner": partner, "partner_rank": rank, "partner_drop": drops[partner],
            "met": rank <= TOP and drops[partner] >= MIN_DROP, "own_drop": drops[erased], "top": others[:TOP],
            "drops": {o: drops[o] for o in others}}
