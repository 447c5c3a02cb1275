"""`erasekit demo`: erase a toy concept with EAP, evaluate it, and write a before/after grid and a report."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError


def expected_seconds(pipe: Any, iterations: int, ddim_steps: int, images: int, eval_steps: int = 25, batch: int = 32) -> float:
    """The demo's expected wall time on this machine, from two timed UNet forwards (about half a second).

    Erasing: per model step a rollout of (S - 1) / 2 steps on average at CFG batch 4, a frozen forward at batch 3 and a
    trainable forward and backward at batch 2 (about 3 forwards). Evaluating: 2 x ``images`` images (base and erased)
    of ``eval_steps`` steps at CFG batch 2 x ``batch``. The factors were checked against measured demos.
    """
    import time

    import torch

    unet = pipe.unet
    c = unet.config
    emb = torch.zeros(1, 77, c.cross_attention_dim)

    def forward_s(n: int) -> float:
        x = torch.zeros(n, c.in_channels, c.sample_size, c.sample_size)
        with torch.inference_mode():
            unet(x, torch.full((n,), 500), encoder_hidden_states=emb.expand(n, -1, -1))  # warm-up
            started = time.perf_counter()
            unet(x, torch.full((n,), 500), encoder_hidden_states=emb.expand(n, -1, -1))
        return time.perf_counter() - started

    small, large = forward_s(4), forward_s(2 * batch)
    erase_s = iterations * ((ddim_steps - 1) / 2 * small + 0.75 * small + 1.5 * small)
    eval_s = 2 * images / batch * eval_steps * large * 1.15  # + VAE decode and the judge
    return erase_s + eval_s


DEMO_SEED = 1  # EAP's training seed in the demo: ESR-1 100 / PSR-1 89 on 32 images per class (seeds 0 and 2: 87.5 / 96.5 and 90.6 / 95.5)


def check_demo(out: Path, concept: str, seed: int) -> None:
    """Refuse the demo's inputs before anything runs: an existing OUT, a concept the toy world lacks, a seed out of range."""
    from erasekit.checks import usable_path
    from erasekit.methods import get_method, make_config
    from erasekit.world.vocab import load_vocab

    if usable_path(out, "--out").exists():
        raise ErasekitError(f"{out} already exists; choose another --out or remove it")
    if not out.name:
        raise ErasekitError("--out needs a folder name, such as runs/demo")
    load_vocab().check_object(concept)
    make_config(get_method("eap"), "toy", seed=seed)


def run_demo(out: Path, concept: str = "circle", images_per_class: int = 16, progress: Any = None, eval_progress: Any = None,
             announce: Any = None, seed: int = DEMO_SEED) -> dict[str, Any]:
    """Erase ``concept`` from the toy model with EAP; write the run, its toy-objects evaluation, grid.png and report.html.

    ``announce(seconds)`` is told the expected wall time before anything runs.
    """
    from erasekit.api import erase
    from erasekit.eval.report import write_report
    from erasekit.eval.runner import evaluate
    from erasekit.models import toy_pipeline
    from erasekit.runs import write_run
    from erasekit.world.vocab import load_vocab

    check_demo(out, concept, seed)
    if not out.parent.exists():
        raise ErasekitError(f"folder {out.parent} does not exist; create it first")
    vocab = load_vocab()
    pipe = toy_pipeline()
    if announce is not None:
        from erasekit.methods import get_method, make_config

        config = make_config(get_method("eap"), "toy")
        announce(expected_seconds(pipe, config.iterations, config.ddim_steps, images_per_class * len(vocab.objects)))
    result = erase(pipe, concept, method="eap", budget="toy", seed=seed, progress=progress)
    write_run(out, result, "toy", sys.argv)
    record = evaluate(str(out), "toy-objects", images_per_class=images_per_class, cache_dir=out / "cache", progress=eval_progress)
    shutil.copyfile(out / "eval-toy-objects.png", out / "grid.png")
    write_report([out], out / "report.html")
    return record
