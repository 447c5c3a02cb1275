"""The report's words: what each metric means, how many images and seeds lie behind each figure, and when
they are too few to mean anything. Pure functions of evaluation records (``eval-<suite>.json``).

Thresholds, and why:

- a rate (ESR, PSR, NER, the toy implicit rate, a style or CLIP score) from fewer than ``MIN_RATE_IMAGES`` = 25
  images: the 95 % Wilson interval of a rate near 50 % is then wider than ±18 points, more than most differences
  between methods in the README's tables, so the figure cannot tell methods apart;
- an FID from fewer than ``MIN_FID_IMAGES`` = 128 images: the covariance it compares (of the toy judge's 128
  features; real models' CLIP features have more) is then not even full rank, and the value mostly reflects the
  sample size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MIN_RATE_IMAGES = 25
MIN_FID_IMAGES = 128

# metric family -> (how its keys start, its plain-words paragraph, which images it rests on: erased, kept or all)
METRICS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "ESR": (("ESR",), "ESR-k, the erasure success rate (%): of the images whose prompt names an erased concept, the share in which "
            "the classifier does not place that concept among its top k guesses. Higher means the concept is more thoroughly gone "
            "(100: it never shows); the base row is where the model started.", "erased"),
    "PSR": (("PSR",), "PSR-k, the preservation success rate (%): of the images whose prompt names a concept that was not erased, the "
            "share in which the classifier still places that concept among its top k guesses. Higher is better; the base row is "
            "the most an erasure could keep.", "kept"),
    "FID": (("FID",), "FID vs base: the Fréchet distance between the image features of the erased model and of the base model, for "
            "the same prompts and seeds (0: the two sets look alike). On the preserved side lower is better: the erasure left "
            "the other concepts alone; on the erased side a higher value is expected. FID grows as the image count shrinks, "
            "so compare FIDs only at the same count.", "side"),
    "NER": (("NER", "implicit"), "NER@t, the nudity exposure rate (%): the share of images in which the detector finds an exposed "
            "body part with confidence at least t; implicit@t is the toy world's analogue (the judge sees the skull mark with "
            "confidence at least t). Lower after erasure is better; the prompts evoke the concept without naming it.", "all"),
    "style score": (("style score",), "Style score (%): the judge's mean probability that an image shows the style its prompt asks "
                    "for. After erasing a style the aim is a lower score on the erased styles and an unchanged one on the retained "
                    "styles.", "side"),
    "CLIP score": (("CLIP score",), "CLIP score: how well each image matches its own prompt by CLIP (cosine similarity x 100). After "
                   "an erasure the aim is a lower score on the erased concepts and an unchanged one on the retained ones.", "side"),
}


@dataclass(frozen=True)
class Basis:
    """What one figure rests on, per model: its images and their distinct evaluation seeds."""

    images: int
    seeds: int


def family_of_key(key: str) -> str | None:
    """The metric family a headline key belongs to ('ESR-1' -> 'ESR'), or None for one this module does not explain."""
    return next((name for name, (prefixes, _, _) in METRICS.items() if key.startswith(prefixes)), None)


def basis(key: str, ev: dict[str, Any]) -> Basis:
    """The images and seeds behind headline ``key`` of evaluation ``ev`` (for one model)."""
    family = family_of_key(key)
    erased = set(ev.get("erased") or [])
    images = ev.get("images") or []
    which = METRICS[family][2] if family else "all"
    if which == "side":  # 'FID vs base, erased', 'style score retained' ...: the side its name says, else every image
        which = "erased" if key.endswith("erased") else "kept" if key.endswith(("preserved", "retained")) else "all"
    if which == "erased":
        chosen = [im for im in images if im.get("group") in erased]
    elif which == "kept":
        chosen = [im for im in images if im.get("group") not in erased]
    else:
        chosen = list(images)
    return Basis(len(chosen), len({im.get("seed") for im in chosen}))


def too_few(key: str, n: int) -> bool:
    """Whether ``n`` images are too few for figure ``key`` to mean anything."""
    return n < (MIN_FID_IMAGES if family_of_key(key) == "FID" else MIN_RATE_IMAGES)


def warning(family: str, figures: list[tuple[str, int]]) -> str:
    """One warning for the figures of a metric family that rest on too few images: (figure, images) pairs."""
    listed = ", ".join(f"{key} on {n}" for key, n in figures)
    if family == "FID":
        return (f"too few images for FID ({listed}; fewer than {MIN_FID_IMAGES}): the feature covariance it compares is not full "
                "rank, so the value mostly reflects the image count; raise --images-per-class before reading it")
    n = min(n for _, n in figures)
    return (f"too few images ({listed}; fewer than {MIN_RATE_IMAGES}): a rate from {n} images has a 95 % interval of about "
            f"±{half_width(n):.0f} points near 50 %, too wide to tell methods apart; raise --images-per-class")


def half_width(n: int, z: float = 1.96) -> float:
    """Half the 95 % Wilson interval of a rate of 50 % measured on ``n`` images, in points."""
    if n <= 0:
        return 50.0
    return 100 * z * math.sqrt(0.25 / n + z * z / (4 * n * n)) / (1 + z * z / n)


def explain(evals: Sequence[tuple[str, dict[str, Any]]]) -> list[tuple[str, list[str], list[str]]]:
    """Per metric family found in ``evals`` ((run name, evaluation record) pairs of one suite): its paragraph,
    the images and seeds behind each of its figures, and the warnings where they are too few."""
    out = []
    headlines = [m.get("headline", {}) for _, ev in evals for m in [*ev.get("metrics", {}).values(), ev.get("comparison", {})]]
    keys = list(dict.fromkeys(k for headline in headlines for k in headline))
    for family, (_, text, _) in METRICS.items():
        mine = [k for k in keys if family_of_key(k) == family]
        if not mine:
            continue
        counts, few = [], []
        for run, ev in evals:
            shared: dict[Basis, list[str]] = {}
            for key in mine:
                shared.setdefault(basis(key, ev), []).append(key)
            where = f" ({run})" if len(evals) > 1 else ""
            for b, names in shared.items():
                seeds = "one evaluation seed per image" if b.seeds == b.images else f"{b.seeds} evaluation seeds"
                counts.append(f"{', '.join(names)}{where}: {b.images} images per model ({seeds})")
                few += [(f"{name}{where}", b.images) for name in names if too_few(name, b.images)]
        out.append((text, counts, [warning(family, few)] if few else []))
    return out


SEEDS_NOTE = ("Each erased row comes from one training run (one training seed). On the toy world one seed's rates differ from the "
              "next by 10-30 points (README); `erasekit compare --seeds 3` trains on several seeds and gives every rate a 95 % interval.")
