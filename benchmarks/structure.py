"""How much of the base image survives an erasure: layout and colour of erased images against the base at the same seed.

    python benchmarks/structure.py runs/cmp runs/cmp-abo --concept circle --images 32

Reads the deltas of one or more `erasekit compare` folders (``<method>-seed<N>/delta.safetensors``, toy model), draws
the concept's evaluation prompt at seeds 0..images-1 with the base model and with each erased model, and prints per
method, as mean [95 % interval] over training seeds:

- pixel RMSE: root mean square difference to the base image of the same seed, on a 0-1 scale (lower: closer);
- layout RMSE: the same on 8 x 8 block means of the grey image (where things are, not their edges);
- colour kept / style kept: share of images whose toy judge's colour (style) is the base image's (%);
- feature cosine: cosine similarity of the toy judge's features to the base image's;
- synonym ESR-1: the share of the concept's `toy-synonyms` images (its other names in four paraphrases, ``images``
  of them) the judge does not call the concept (%): RealEra's claim, the erasure reaching words it was not given.

This is All-but-One's claim (issue 18): an erasure that moves only the concept's guidance term leaves the rest of the
sample (its layout, its colour) where the base model put it.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

import erasekit
from erasekit.eval.intervals import Interval, rate_interval
from erasekit.models import toy_dir, toy_pipeline
from erasekit.world.captions import object_prompt
from erasekit.world.check import generate, load_toy_judge
from erasekit.world.judge import judge_images

STEPS, GUIDANCE = 25, 7.5


def mean_interval(values: list[float]) -> Interval:
    """Mean over training seeds with Student's t interval (not a rate: no clipping to 0-100)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    h = float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return Interval(mean, mean - h, mean + h, len(values))


def blocks(images: np.ndarray, size: int = 8) -> np.ndarray:
    """Grey images averaged over size x size blocks (N x H/size x W/size), 0-1."""
    grey = images.astype(np.float64).mean(axis=-1) / 255.0
    n, h, w = grey.shape
    return grey.reshape(n, h // size, size, w // size, size).mean(axis=(2, 4))


def measure(images: np.ndarray, base: np.ndarray, judged: dict, base_judged: dict) -> dict[str, float]:
    """The five structure measures of one erased model's images against the base's (same prompts, same seeds)."""
    diff = (images.astype(np.float64) - base.astype(np.float64)) / 255.0
    f, g = judged["features"], base_judged["features"]
    cos = (f * g).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(g, axis=1) + 1e-12)
    return {
        "pixel RMSE": float(np.sqrt((diff**2).mean())),
        "layout RMSE": float(np.sqrt(((blocks(images) - blocks(base)) ** 2).mean())),
        "colour kept %": 100 * float((judged["colour"].argmax(1) == base_judged["colour"].argmax(1)).mean()),
        "style kept %": 100 * float((judged["style"].argmax(1) == base_judged["style"].argmax(1)).mean()),
        "feature cosine": float(cos.mean()),
    }


def main() -> None:
    """Measure every method's deltas in the given compare folders and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="erasekit compare output folders")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--methods", default="", help="comma-separated methods to include (default: all found)")
    args = parser.parse_args()
    wanted = {m for m in args.methods.split(",") if m}
    runs: dict[str, list[Path]] = defaultdict(list)
    for folder in args.folders:
        for delta in sorted(folder.glob("*-seed*/delta.safetensors")):
            method = re.sub(r"-seed\d+$", "", delta.parent.name)
            if not wanted or method in wanted:
                runs[method].append(delta)
    if not runs:
        raise SystemExit(f"no <method>-seed<N>/delta.safetensors under {', '.join(map(str, args.folders))}")
    judge = load_toy_judge(toy_dir() / "judge")
    prompts = [object_prompt(args.concept)] * args.images
    seeds = list(range(args.images))
    base = generate(toy_pipeline(), prompts, seeds, STEPS, GUIDANCE)
    base_judged = judge_images(judge, base)
    from erasekit.eval.suites import get_suite, plan_toy_synonyms, resolve_settings
    from erasekit.world.vocab import load_vocab

    synonyms = plan_toy_synonyms(resolve_settings(get_suite("toy-synonyms"), images_per_class=args.images), [args.concept])
    rows = [i for i, g in enumerate(synonyms.groups) if g == args.concept]
    syn_prompts, syn_seeds = [synonyms.prompts[i] for i in rows], [synonyms.seeds[i] for i in rows]
    concept_class = load_vocab().objects.index(args.concept)
    names = ["pixel RMSE", "layout RMSE", "colour kept %", "style kept %", "feature cosine", "synonym ESR-1 %"]
    print(f"{args.concept}: {args.images} images of {prompts[0]!r} per model (seeds 0-{args.images - 1}), DDIM {STEPS}, CFG {GUIDANCE}")
    print("| method | seeds | " + " | ".join(names) + " |")
    print("| --- | ---: |" + " ---: |" * len(names))
    base_said = judge_images(judge, generate(toy_pipeline(), syn_prompts, syn_seeds, STEPS, GUIDANCE))["object"].argmax(1)
    print(f"| base (no erasure) | - | 0 | 0 | 100 | 100 | 1 | {100 * float((base_said != concept_class).mean()):.1f} |")
    for method, deltas in runs.items():
        per_seed = []
        for path in deltas:
            pipe = erasekit.load(toy_pipeline(), path)
            images = generate(pipe, prompts, seeds, STEPS, GUIDANCE)
            measured = measure(images, base, judge_images(judge, images), base_judged)
            said = judge_images(judge, generate(pipe, syn_prompts, syn_seeds, STEPS, GUIDANCE))["object"].argmax(1)
            measured["synonym ESR-1 %"] = 100 * float((said != concept_class).mean())
            per_seed.append(measured)
        cells = []
        for name in names:
            values = [m[name] for m in per_seed]
            if len(values) < 2:
                cells.append(f"{values[0]:.3f}")
            elif name.endswith("%"):
                cells.append(rate_interval(values, args.images).cell())
            else:
                iv = mean_interval(values)
                cells.append(f"{iv.mean:.3f} [{iv.lo:.3f}, {iv.hi:.3f}]")
        print(f"| {method} | {len(deltas)} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
