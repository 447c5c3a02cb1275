"""Measure the toy Janus's quality bars (issue 21): the toy judge's top-1 on the model's own generations, and speed.

Every object x colour prompt (styles cycling) is drawn with classifier-free guidance on the image-token logits,
as Janus does it (:func:`erasekit.autoregressive.janus.generate`), one seed per image, and judged by the toy
world's judge. Bars: object top-1 >= 80 %, colour top-1 >= 80 %.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.autoregressive.janus import check_resolution, generate, load_janus
from erasekit.errors import ErasekitError

Progress = Callable[[str, int, int, dict], None]
BARS = {"object_top1": 0.8, "colour_top1": 0.8}
SEED, TIMING_SEED = 5_000_000, 6_000_000  # apart from the diffusion check's seeds


def default_janus_dir() -> Path:
    """Where the shipped toy Janus lives (``assets/toy/janus``), whether or not it has been shipped yet."""
    from erasekit.models import toy_janus_dir

    return toy_janus_dir()


def toy_dir() -> Path:
    """Folder of the shipped toy world (``judge/`` inside); as :func:`erasekit.world.check.default_toy_dir`, without loading diffusers."""
    return Path(str(resources.files("erasekit.world").joinpath("assets/toy")))


def janus_requests(images_per_prompt: int) -> tuple[list[str], np.ndarray]:
    """One prompt per object x colour (x ``images_per_prompt``), naming a style that cycles; labels (n, 3): object, colour, style."""
    from erasekit.world.captions import scene_prompt
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    prompts, labels = [], []
    for o, obj in enumerate(vocab.objects):
        for c, colour in enumerate(vocab.colours):
            for r in range(images_per_prompt):
                s = (o + c * len(vocab.objects) + r) % len(vocab.styles)  # every style, spread over objects and colours
                prompts.append(scene_prompt(obj, colour, vocab.styles[s]))
                labels.append((o, c, s))
    return prompts, np.array(labels, dtype=np.int64).reshape(-1, 3)


def _generate(janus: Any, prompts: list[str], seeds: list[int], guidance: float, batch_size: int) -> np.ndarray:
    """Images of ``prompts`` in batches (each image depends only on its prompt and seed)."""
    return np.concatenate([generate(janus, prompts[s : s + batch_size], seeds[s : s + batch_size], guidance)
                           for s in range(0, len(prompts), batch_size)])


def janus_check(
    janus_dir: Path | None = None,
    judge_dir: Path | None = None,
    images_per_prompt: int = 2,
    guidance: float = 5.0,
    progress: Progress | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Judge the toy Janus's generations; returns the JSON object `erasekit world check-janus --json` prints.

    Rates are fractions in [0, 1] (as `erasekit world check` gives them); ``bars`` and ``met`` say whether issue 21's are reached.
    """
    from erasekit.checks import MAX_GUIDANCE, check_between
    from erasekit.world.judge import Judge, judge_images

    check_between("images_per_prompt", images_per_prompt, 1, 1000)
    check_between("guidance", guidance, 0.0, MAX_GUIDANCE, why="a CFG scale; Janus uses 5")
    check_between("batch_size", batch_size, 1, 4096)
    report = progress or (lambda *a: None)
    judge_dir = judge_dir or toy_dir() / "judge"
    if not (judge_dir / "judge.safetensors").is_file():
        raise ErasekitError(f"no judge at {judge_dir} (judge.safetensors missing); build one with `erasekit world train`")
    folder = janus_dir or default_janus_dir()
    if not (folder / "config.json").is_file():
        raise ErasekitError(f"no toy Janus at {folder} (config.json missing); train one with `erasekit world janus --out DIR` and pass DIR/janus")
    from erasekit.world.janus_train import image_size

    janus = load_janus(folder)
    check_resolution(janus.model, image_size())  # the judge reads the toy world's resolution
    judge = Judge.load(judge_dir)
    report("generate", 0, 2, {})
    prompts, labels = janus_requests(images_per_prompt)
    probs = judge_images(judge, _generate(janus, prompts, [SEED + i for i in range(len(prompts))], guidance, batch_size))
    top1 = {f"{head}_top1": float(np.mean(probs[head].argmax(1) == labels[:, j])) for j, head in enumerate(("object", "colour", "style"))}
    report("timing", 1, 2, {})
    timing = [prompts[i % len(prompts)] for i in range(64)]
    start = time.perf_counter()  # after the generations above, so one-time warm-up costs are not counted
    _generate(janus, timing, [TIMING_SEED + i for i in range(64)], guidance, 64)
    seconds = time.perf_counter() - start
    report("done", 2, 2, {})
    return {
        **{k: round(v, 4) for k, v in top1.items()},
        "images": len(prompts),
        "guidance": guidance,
        "seconds_per_64_images": round(seconds, 2),
        "bars": BARS,
        "met": all(top1[k] >= bar for k, bar in BARS.items()),
    }
