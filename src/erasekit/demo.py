"""`erasekit demo`: erase a toy concept with EAP, evaluate it, and write a before/after grid and a report."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError


def run_demo(out: Path, concept: str = "circle", images_per_class: int = 16, progress: Any = None, eval_progress: Any = None) -> dict[str, Any]:
    """Erase ``concept`` from the toy model with EAP; write the run, its toy-objects evaluation, grid.png and report.html."""
    from erasekit.api import erase
    from erasekit.runs import write_run
    from erasekit.eval.report import write_report
    from erasekit.eval.runner import evaluate
    from erasekit.models import toy_pipeline
    from erasekit.world.vocab import load_vocab

    if out.exists():
        raise ErasekitError(f"{out} already exists; choose another --out or remove it")
    if not out.parent.exists():
        raise ErasekitError(f"folder {out.parent} does not exist; create it first")
    load_vocab().check_object(concept)
    result = erase(toy_pipeline(), concept, method="eap", budget="toy", progress=progress)
    write_run(out, result, "toy", sys.argv)
    record = evaluate(str(out), "toy-objects", images_per_class=images_per_class, cache_dir=out / "cache", progress=eval_progress)
    shutil.copyfile(out / "eval-toy-objects.png", out / "grid.png")
    write_report([out], out / "report.html")
    return record
