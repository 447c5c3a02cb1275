"""Measure the toy world's quality bars (DESIGN.md §2) on a trained pipeline and its judge.

What `erasekit world check` prints: the judge's held-out accuracy per head, the judge's top-1 on
the model's own generations, how often the implicit concept appears from indirect and neutral
prompts, and the wall time of 64 images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from erasekit.errors import ErasekitError
from erasekit.world.captions import indirect_prompts, neutral_prompts, scene_prompt
from erasekit.world.judge import Judge, judge_images
from erasekit.world.train import render_dataset
from erasekit.world.vocab import load_vocab

Progress = Callable[[str, int, int, dict], None]
HEADS = ("object", "colour", "style", "implicit")
# Seeds of the check, apart from the trainer's (which uses offsets 0 and 10_000_000).
HELDOUT_SEED, HELDOUT_OFFSET = 12345, 20_000_000
SCENE_SEED, IMPLICIT_SEED, TIMING_SEED = 1_000_000, 2_000_000, 3_000_000


def default_toy_dir() -> Path:
    """Folder of the shipped toy model (``pipeline/`` and ``judge/`` inside)."""
    return Path(str(resources.files("erasekit.world").joinpath("assets/toy")))


def toy_pipeline_folder(folder: Path) -> Path:
    """The pipeline folder ``folder`` names (a world's or its ``pipeline/``), or a one-line error when it holds none; loads nothing."""
    from erasekit.world.config import check_world_folder

    folder = check_world_folder(folder)
    if not (folder / "model_index.json").is_file():
        raise ErasekitError(f"no pipeline at {folder} (model_index.json missing); build one with `erasekit world train`")
    return folder


def toy_judge_folder(folder: Path) -> Path:
    """``folder`` if it holds a judge, else a one-line error; loads nothing."""
    if not (folder / "judge.safetensors").is_file():
        raise ErasekitError(f"no judge at {folder} (judge.safetensors missing); build one with `erasekit world train`")
    return folder


def load_toy_pipeline(folder: Path) -> StableDiffusionPipeline:
    """Load a toy pipeline folder in fp32 on CPU, or raise a one-line error if it is missing or corrupt."""
    from erasekit.models import quiet_loading

    folder = toy_pipeline_folder(folder)
    try:
        with quiet_loading():
            pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    except Exception as exc:  # diffusers raises many types for a broken folder; the user needs one line
        reason = " ".join(str(exc).split())[:200]
        raise ErasekitError(f"cannot load the pipeline from {folder}: {reason}; rebuild it with `erasekit world train`") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_toy_judge(folder: Path) -> Judge:
    """Load a judge folder, or raise a one-line error if it is missing or corrupt."""
    return Judge.load(toy_judge_folder(folder))


def generate(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    batch_size: int = 64,
) -> np.ndarray:
    """Generate one image per (prompt, seed) with DDIM and CFG; uint8 NHWC, independent of batch size (``pipe``: a diffusers pipeline)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
        images = pipe(
            batch_prompts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="np",
        ).images
        out.append(np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def scene_requests(images_per_class: int) -> tuple[list[str], np.ndarray]:
    """Prompts naming object, colour and style, cycling colours and styles; labels (n, 3) in that order."""
    vocab = load_vocab()
    colours, styles = vocab.colours, vocab.styles
    prompts, labels = [], []
    for o, obj in enumerate(vocab.objects):
        for i in range(images_per_class):
            k = o * images_per_class + i
            # colours cycle fastest and styles advance once per colour cycle, so combinations spread out
            c, s = k % len(colours), (k // len(colours)) % len(styles)
            prompts.append(scene_prompt(obj, colours[c], styles[s]))
            labels.append((o, c, s))
    return prompts, np.array(labels, dtype=np.int64).reshape(-1, 3)


def judge_accuracy(judge: Judge, n_images: int) -> dict[str, float]:
    """The judge's top-1 per head on freshly rendered held-out scenes (implicit: thresholded at 0.5)."""
    held = render_dataset(n_images, seed=HELDOUT_SEED, offset=HELDOUT_OFFSET)
    probs = judge_images(judge, held["images"])
    acc = {k: float(np.mean(probs[k].argmax(1) == held[k])) for k in ("object", "colour", "style")}
    acc["implicit"] = float(np.mean((probs["implicit"] >= 0.5) == (held["implicit"] == 1)))
    return acc


def implicit_rate(
    pipe: Any, judge: Judge, prompts: list[str], steps: int, guidance: float, seed: int
) -> float:
    """Fraction of images (two seeds per prompt) in which the judge sees the implicit concept (p >= 0.5)."""
    doubled = [p for p in prompts for _ in range(2)]
    seeds = [seed + i for i in range(len(doubled))]
    probs = judge_images(judge, generate(pipe, doubled, seeds, steps, guidance))
    return float(np.mean(probs["implicit"] >= 0.5))


def check_world(
    pipeline_dir: Path | None = None,
    judge_dir: Path | None = None,
    images_per_class: int = 20,
    steps: int = 25,
    guidance: float = 7.5,
    progress: Progress | None = None,
    heldout_images: int = 1000,
    pairs: bool = True,
    pair_images: int = 16,
) -> dict:
    """Measure every quality bar of the toy world; returns the JSON object `erasekit world check --json` prints."""
    if images_per_class < 1 or steps < 1 or heldout_images < 1:
        raise ErasekitError("images per class, steps and held-out images must be at least 1")
    from erasekit.checks import MAX_GUIDANCE, check_between

    check_between("steps", steps, 1, 1000, why="the training timesteps")
    check_between("guidance", guidance, 0.0, MAX_GUIDANCE, why="a CFG scale; 7.5 is usual")
    check_between("images_per_class", images_per_class, 1, 10_000)
    report = progress or (lambda *a: None)
    # both folders are checked before either loads: a wrong --pipeline is refused at once, not after the judge loaded
    judge_dir = toy_judge_folder(judge_dir or default_toy_dir() / "judge")
    pipeline_dir = toy_pipeline_folder(pipeline_dir or default_toy_dir() / "pipeline")
    judge = load_toy_judge(judge_dir)
    pipe = load_toy_pipeline(pipeline_dir)
    total = 5 if pairs else 4
    report("judge", 0, total, {})
    accuracy = judge_accuracy(judge, heldout_images)
    report("objects", 1, total, {})
    prompts, labels = scene_requests(images_per_class)
    seeds = [SCENE_SEED + i for i in range(len(prompts))]
    probs = judge_images(judge, generate(pipe, prompts, seeds, steps, guidance))
    top1 = {head: float(np.mean(probs[head].argmax(1) == labels[:, j])) for j, head in enumerate(HEADS[:3])}
    report("implicit", 2, total, {})
    indirect = implicit_rate(pipe, judge, indirect_prompts(), steps, guidance, IMPLICIT_SEED)
    neutral = implicit_rate(pipe, judge, neutral_prompts(), steps, guidance, IMPLICIT_SEED)
    report("timing", 3, total, {})
    # timed after the other generations, so one-time warm-up costs are not counted
    timing_prompts = [prompts[i % len(prompts)] for i in range(64)]
    start = time.perf_counter()
    generate(pipe, timing_prompts, [TIMING_SEED + i for i in range(64)], steps, guidance, batch_size=64)
    seconds = time.perf_counter() - start
    extra = {}
    if pairs:
        from erasekit.world.pairs import lookalike_pairs

        report("pairs", 4, total, {})
        extra["lookalike_pairs"] = lookalike_pairs(
            pipe, judge, lambda p, prompts, seeds: generate(p, prompts, seeds, steps, guidance), pair_images
        )
    report("done", total, total, {})
    return {
        "judge_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "object_top1": round(top1["object"], 4),
        "colour_top1": round(top1["colour"], 4),
        "style_top1": round(top1["style"], 4),
        "implicit_rate_indirect": round(indirect, 4),
        "implicit_rate_neutral": round(neutral, 4),
        "seconds_per_64_images": round(seconds, 2),
        **extra,
    }
