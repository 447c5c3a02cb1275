"""Typer commands `evaluate`, `report` and `spectrum` (registered into the main app with ``app.command()(f)``)."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from erasekit.run_display import progress_bar
from erasekit.world.cli import user_errors

status = Console(stderr=True)
# commands whose settings dataclass supplies flags beyond their typer options (evaluate, attack) register with this
SETTINGS_FLAGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _command() -> str:
    return " ".join(shlex.quote(a) for a in ["erasekit", *sys.argv[1:]])


@contextmanager
def _image_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar over images, one line per model (base, erased); plain lines in a log file."""
    with progress_bar(status) as bar:
        tasks: dict[str, Any] = {}

        def tick(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.advance(tasks[name], done)

        yield tick


def metrics_table(result: dict[str, Any]) -> Table:
    """The headline metrics of an evaluation: one row per metric (its threshold in its name), one column per model.

    A metric measured by a detector (NudeNet's NER) carries the detector's version beside its name.
    """
    from erasekit.eval.report import fmt

    columns = {model: dict(m.get("headline", {})) for model, m in result["metrics"].items()}
    measured = {k for values in columns.values() for k in values}
    version = result.get("scorer", {}).get("detector_version")
    if "erased" in columns:
        columns["erased"].update(result.get("comparison", {}).get("headline", {}))
    keys = list(dict.fromkeys(k for values in columns.values() for k in values))
    title = f"{result['suite']}: {result['target']}" + (f" (erased: {', '.join(result['erased'])})" if result.get("erased") else "")
    table = Table(title=title)
    table.add_column("metric", no_wrap=True)
    for model in columns:
        table.add_column(model, justify="right", no_wrap=True)
    for key in keys:
        label = f"{key} ({version})" if version and key in measured else key
        table.add_row(label, *(fmt(key, values.get(key)) for values in columns.values()))
    return table


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("interval") is None:
        return "–"
    iv = entry["interval"]
    return f"{iv['mean']:.1f} [{iv['lo']:.1f}, {iv['hi']:.1f}] ({entry['unsafe']}/{entry['scored']})"


def safety_table(result: dict[str, Any]) -> Table | None:
    """Unsafe % per domain and overall with 95 % Wilson intervals (unsafe/scored), per model; the change with its paired interval."""
    per = {model: m for model, m in result["metrics"].items() if "per_domain" in m and "overall" in m}
    if not per:
        return None
    scorer = result.get("scorer", {})
    judge = scorer.get("evaluator") or scorer.get("scorer", "?")
    version = f", {scorer['detector_version']}" if scorer.get("detector_version") else ""
    table = Table(title=f"unsafe % [95 % Wilson interval] (unsafe/scored), judged by {judge}{version}")
    table.add_column("domain", no_wrap=True)
    for model in per:
        table.add_column(model, justify="right")
    change = result.get("comparison", {})
    if "per_domain" in change:
        table.add_column("erased − base [95 %]", justify="right")
    for name in [*dict.fromkeys(d for m in per.values() for d in m["per_domain"]), "overall"]:
        cells = [_cell(m["overall"] if name == "overall" else m["per_domain"].get(name)) for m in per.values()]
        if "per_domain" in change:
            diff = change["overall"] if name == "overall" else change["per_domain"].get(name)
            cells.append("–" if not diff else f"{diff['difference']:+.1f} [{diff['lo']:+.1f}, {diff['hi']:+.1f}]")
        table.add_row(name, *cells)
    table.add_row("unscored", *(str(m["unscored"]) for m in per.values()), *([""] if "per_domain" in change else []))
    return table


def per_class_table(result: dict[str, Any]) -> Table | None:
    """Top-1 rate per class and model (ESR-1 for an erased class, PSR-1 for a preserved one), when the suite has classes."""
    per = {model: m["per_class"]["top-1"] for model, m in result["metrics"].items() if "top-1" in m.get("per_class", {})}
    if not per:
        return None
    table = Table(title="per class, top-1 (ESR-1 for erased classes, PSR-1 for the rest)")
    table.add_column("class")
    for model in per:
        table.add_column(model, justify="right")
    for name in next(iter(per.values())):
        mark = " (erased)" if name in result.get("erased", []) else ""
        table.add_row(name + mark, *(f"{rates.get(name, float('nan')):.1f}" for rates in per.values()))
    return table


def evaluate(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="A base model ('toy', 'toy-janus', a diffusers or Janus folder), a delta file, or a run folder from `erasekit erase`."),
    suite: str = typer.Option("toy-objects", "--suite", "-s", help="toy-objects, toy-synonyms, toy-styles, toy-implicit, toy-safety, imagenette, i2p, artists or t2isafety."),
    out_json: Optional[Path] = typer.Option(None, "--json", help="Also write the result here (a run folder always gets eval-<suite>.json)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model of a delta (default: the one run.json or the delta names)."),
    show_settings: bool = typer.Option(False, "--show-settings", help="Print the suite's settings (each is a flag) with the values it would use, and exit."),
    erased: list[str] = typer.Option([], "--erased", help="Erased concept, for a base model alone or to override the delta's (repeatable)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Generation cache (default: $ERASEKIT_CACHE or ~/.cache/erasekit/generations)."),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    force: bool = typer.Option(False, "--force", help="Apply a delta even if its base hash differs."),
) -> None:
    """Evaluate a model or an erasure with a suite (base and erased in the same run); print the metrics table.

    The suite's settings are flags too (--images-per-class 20 --steps 25 --seed 0 --judge DIR ...; --show-settings lists them).
    """
    with user_errors():
        from erasekit.eval.runner import evaluate as run_evaluate
        from erasekit.eval.suites import Settings, get_suite
        from erasekit.runs import parse_method_flags

        given = parse_method_flags(Settings, list(ctx.args))
        if show_settings:
            values = {**get_suite(suite).defaults, **given}
            from erasekit.eval.runner import autoregressive_target, resolve_target

            if autoregressive_target(resolve_target(target, model).base, None):  # a Janus: no sampler steps, Janus-Pro's guidance
                from erasekit.eval.generate import JANUS_STEPS
                from erasekit.panels import JANUS_GUIDANCE

                values.update(steps=JANUS_STEPS, guidance=given.get("guidance", JANUS_GUIDANCE))
            _print_settings(Settings, values)
            return
        with _image_bar() as tick:
            result = run_evaluate(target, suite, model=model, out_json=out_json, cache_dir=cache_dir, erased=erased or None, device=device,
                                  force=force, command=_command(), progress=tick, **given)
    if os.environ.get("RANK", "0") not in ("", "0"):
        return  # under `accelerate launch` the main process prints (and wrote the files)
    out = Console()
    out.print(metrics_table(result))
    if (classes := per_class_table(result)) is not None:
        out.print(classes)
    if (safety := safety_table(result)) is not None:
        out.print(safety)
        for reason in result.get("scorer", {}).get("unscored_reasons", [])[:3]:
            status.print(f"unscored: {reason}")
    if result.get("scorer", {}).get("detector_version"):
        typer.echo(f"detector: {result['scorer']['detector_version']}")
    generated = ", ".join(f"{k} {v}" for k, v in result["generated"].items())
    status.print(f"generated {generated} new images (cache: {result['cache']})")
    if Path(target).is_dir() and (Path(target) / "delta.safetensors").is_file():
        status.print(f"wrote {Path(target) / f'eval-{suite}.json'}")
    if out_json is not None:
        status.print(f"wrote {out_json}")


def _print_settings(settings_class: type, values: dict[str, Any]) -> None:
    """Every flag of a settings dataclass with the value it will take and its help."""
    import dataclasses

    for f in dataclasses.fields(settings_class):
        if f.metadata.get("flag", True):
            value = values.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
            typer.echo(f"--{f.name.replace('_', '-'):20s} {value!r:10} {f.metadata.get('help', '')}")


def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (evaluated with `erasekit evaluate`) or evaluation JSON files."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write (a Markdown table goes beside it, .md)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out and its .md if they exist."),
) -> None:
    """Write one self-contained HTML report (tables, image grids, plots, commands) comparing runs, plus a Markdown table."""
    with user_errors():
        from erasekit.eval.report import write_report

        html_path, md_path = write_report(list(runs), out, overwrite=overwrite)
    status.print(f"wrote {html_path} and {md_path}")


def spectrum(
    target: str = typer.Argument(..., help="A run folder or a delta file (the erased model)."),
    concepts: str = typer.Option(..., "--concepts", help="File with one concept per line, or 'toy' for every word of the toy world."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for spectrum.csv/.png/.json (default: the run folder)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model of a delta (default: the one it names)."),
    images_per_concept: int = typer.Option(8, "--images-per-concept", help="Images per concept and model."),
    steps: int = typer.Option(25, "--steps", help="DDIM steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="CFG scale."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per generation batch."),
    seed: int = typer.Option(0, "--seed", help="Base seed."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Toy world's judge folder."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Local CLIPModel folder: score concepts by CLIP score instead of the judge."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Generation cache."),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    force: bool = typer.Option(False, "--force", help="Apply a delta even if its base hash differs."),
) -> None:
    """The sensitivity spectrum (Fig. 2) and score-difference analysis (Fig. 1): every concept's score drop, sorted."""
    with user_errors():
        from erasekit.eval.spectrum import spectrum as run_spectrum

        with _image_bar() as tick:
            result = run_spectrum(target, concepts, model=model, out_dir=out, images_per_concept=images_per_concept, steps=steps,
                                  guidance=guidance, batch_size=batch_size, seed=seed, judge=judge, clip=clip, cache_dir=cache_dir,
                                  device=device, force=force, progress=tick)
    table = Table(title=f"score drop ({result['score']}), {result['method']} erasing {', '.join(result['concepts_erased'])}")
    for col in ("concept", "base", "erased", "drop", "distance to target"):
        table.add_column(col, justify="left" if col == "concept" else "right")
    for r in result["rows"]:
        dist = "–" if r["distance_to_target"] is None else f"{r['distance_to_target']:.3g}"
        table.add_row(r["concept"], f"{r['base']:.1f}", f"{r['erased']:.1f}", f"{r['drop']:+.1f}", dist)
    Console().print(table)
    if result["spearman_drop_vs_distance"] is not None:
        typer.echo(f"Spearman correlation of drop vs distance to target: {result['spearman_drop_vs_distance']:.3f}")
    folder = out or Path(target)
    status.print(f"wrote {folder / 'spectrum.csv'}, {folder / 'spectrum.png'}, {folder / 'spectrum.json'}")
