"""`erasekit demo`: erase a toy concept with EAP, then write a before/after grid and a small report."""

from __future__ import annotations

import base64
import html
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.errors import ErasekitError

DEMO_PROMPTS = ["an image of a {}".format(o) for o in ("circle", "ring", "moon", "hexagon", "star", "square")]


def _judge_objects(images: np.ndarray, judge: Any, labels: list[int]) -> float:
    from erasekit.world.judge import judge_images

    probs = judge_images(judge, images)["object"]
    return float(np.mean(probs.argmax(1) == np.array(labels)))


def run_demo(out: Path, concept: str = "circle", images: int = 6, progress: Any = None) -> dict[str, Any]:
    """Erase ``concept`` from the toy model with EAP; write run files, grid.png, report.html, report.md."""
    from erasekit.api import erase
    from erasekit.cli import write_run
    from erasekit.grid import prompt_grid
    from erasekit.models import toy_dir, toy_pipeline
    from erasekit.sampling import generate
    from erasekit.world.judge import Judge
    from erasekit.world.vocab import load_vocab

    if out.exists():
        raise ErasekitError(f"{out} already exists; choose another --out or remove it")
    if not out.parent.exists():
        raise ErasekitError(f"folder {out.parent} does not exist; create it first")
    vocab = load_vocab()
    vocab.check_object(concept)
    pipe = toy_pipeline()
    judge = Judge.load(toy_dir() / "judge")
    result = erase(pipe, concept, method="eap", budget="toy", progress=progress)
    prompts = [f"an image of a {concept}"] + [p for p in DEMO_PROMPTS if not p.endswith(f" {concept}")][:5]
    objects = [p.rsplit(" ", 1)[1] for p in prompts]
    all_prompts = [p for p in prompts for _ in range(images)]
    seeds = [1000 * i + j for i in range(len(prompts)) for j in range(images)]
    before = generate(pipe, all_prompts, seeds)
    result.apply(pipe)
    after = generate(pipe, all_prompts, seeds)
    rows = []
    for i, obj in enumerate(objects):
        sl = slice(i * images, (i + 1) * images)
        label = [vocab.objects.index(obj)] * images
        rows.append({"prompt": prompts[i], "role": "erased" if obj == concept else "neighbour" if obj in vocab.neighbours(concept) else "other",
                     "base": _judge_objects(before[sl], judge, label), "erased": _judge_objects(after[sl], judge, label)})
    grid = prompt_grid(prompts, images, [("base", before), (f"eap: erased {concept}", after)])
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        run_dir = tmp / "run"
        write_run(run_dir, result, "toy", sys.argv)
        for name in os.listdir(run_dir):
            shutil.move(str(run_dir / name), tmp / name)
        run_dir.rmdir()
        grid.save(tmp / "grid.png")
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        (tmp / "report.md").write_text(_markdown(rows, concept))
        (tmp / "report.html").write_text(_html(rows, concept, base64.b64encode(buf.getvalue()).decode(), result))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"rows": rows, "seconds": result.timings.get("total_s", 0.0)}


def _markdown(rows: list[dict[str, Any]], concept: str) -> str:
    lines = [f"# erasekit demo: EAP erases '{concept}' from the toy model", "",
             "Judge's object top-1 accuracy on the model's own images (higher = the object is still drawn).", "",
             "| prompt | role | base | erased |", "|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['role']} | {100 * r['base']:.0f} % | {100 * r['erased']:.0f} % |" for r in rows]
    return "\n".join(lines) + "\n"


def _html(rows: list[dict[str, Any]], concept: str, grid_b64: str, result: Any) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r['prompt'])}</td><td>{r['role']}</td><td>{100 * r['base']:.0f} %</td><td>{100 * r['erased']:.0f} %</td></tr>"
        for r in rows
    )
    sensitive = [h.get("most_sensitive") for h in result.history if "most_sensitive" in h]
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>erasekit demo</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #999;padding:4px 8px}</style></head><body>"
        f"<h1>EAP erases “{html.escape(concept)}” from the toy model</h1>"
        "<p>Judge's object top-1 accuracy on each prompt's images: the erased class should drop, its neighbours should stay.</p>"
        f"<table><tr><th>prompt</th><th>role</th><th>base</th><th>erased</th></tr>{body}</table>"
        f"<h2>Base vs erased (same seeds)</h2><img alt='grid' src='data:image/png;base64,{grid_b64}'>"
        f"<p>Most sensitive concept at the end of the search: {html.escape(str(sensitive[-1] if sensitive else '-'))}. "
        f"Run time {result.timings.get('total_s', 0):.0f} s.</p></body></html>"
    )
