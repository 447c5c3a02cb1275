"""`erasekit compare`: erase one concept with several methods under the same seeds, evaluate each, and tabulate.

Every method's erasure runs in its own subprocess (``python -m erasekit.compare_worker``), so its wall time and
peak memory are its own: peak RSS is the child's own VmHWM (``ru_maxrss`` would inherit the parent's), which counts the
imports and the loaded pipeline (the same for every method) plus what the method itself needs. ``wall s``
is the ``erase()`` call alone (no imports, no model load, no saving). In-process mode (``isolate=False``,
for tests and debugging) reports the process's high-water RSS instead, which includes earlier work.
Evaluation runs in the calling process with one generation cache (OUT/cache): the base model's images are
generated once and reused by every method's evaluation. With ``--attack`` every erased model is then attacked
there too (:mod:`erasekit.attack.plan`): same prompts, seeds and base images for all, so the ASR column compares.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import typer

from erasekit.compare_rows import VARIANT_HELP, parse_settings  # noqa: F401  (parse_settings re-exported)
from erasekit.compare_seeds import aggregate, rate_counts
from erasekit.compare_table import markdown  # noqa: F401  (re-exported: the table is part of compare's API)
from erasekit.compare_worker import _run_in_process, _run_isolated, erase_argv, erase_one  # noqa: F401  (erase_argv/erase_one re-exported)
from erasekit.errors import ErasekitError, one_line
from erasekit.world.cli import user_errors

# progress(task label, completed, total or None, info)
CompareProgress = Callable[[str, int, Optional[int], str], None]
SKIPPED_KEYS = ("FID",)  # image-distance columns stay in report.html; the table holds rates


def default_suites(concepts: Sequence[str]) -> list[str]:
    """The toy suites that fit: objects -> toy-objects, styles -> toy-styles, the implicit concept -> toy-implicit.

    For the implicit concept toy-objects is added too: nothing is erased there, so its PSR measures what the erasure broke.
    """
    from erasekit.eval.suites import _norm, match_names, object_aliases, style_aliases
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    implicit = {_norm(vocab.implicit_name), *(_norm(p) for p in vocab.raw["implicit"].get("named_phrases", []))}
    chosen = []
    if match_names(concepts, object_aliases(vocab)):
        chosen.append("toy-objects")
    if match_names(concepts, style_aliases(vocab)):
        chosen.append("toy-styles")
    if any(_norm(c) in implicit or _norm(vocab.implicit_name) in _norm(c).split() for c in concepts):
        chosen += ["toy-implicit"] + ([] if "toy-objects" in chosen else ["toy-objects"])
    if not chosen:
        raise ErasekitError(f"no evaluation suite fits {', '.join(map(repr, concepts))} (not a toy object, style or '{vocab.implicit_name}'); pass --suite")
    return chosen


def _headline(record: dict[str, Any], model: str) -> dict[str, Any]:
    values = dict(record["metrics"].get(model, {}).get("headline", {}))
    return {k: v for k, v in values.items() if not any(s in k for s in SKIPPED_KEYS)}


def _save(out: Path, summary: dict[str, Any]) -> None:
    from erasekit.atomic import atomic_write_files
    from erasekit.models import json_dumps

    atomic_write_files({out / "compare.json": json_dumps(summary).encode("utf-8"), out / "compare.md": markdown(summary).encode("utf-8")})


MAX_SEEDS = 100  # training seeds per method: each is a whole training of every method


RESUME_KEYS = ("model", "concepts", "preserve", "methods", "variants", "settings", "budget", "suites", "seeds", "intervals", "images_per_class", "steps", "judge", "attack")


def check_resumable(out: Path, summary: dict[str, Any]) -> None:
    """Refuse to continue a comparison in ``out`` made with other settings (one line naming what differs)."""
    import json

    try:
        before = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ErasekitError(f"{out / 'compare.json'} cannot be read ({exc.__class__.__name__}); start a new comparison in another --out") from None
    differ = [k for k in RESUME_KEYS if before.get(k) != json.loads(json.dumps(summary.get(k), default=str))]
    if differ:
        raise ErasekitError(f"{out} holds a comparison with other settings ({', '.join(differ)} differ); rerun with its settings, or choose a new --out")


def finished_record(run: Path) -> dict[str, Any] | None:
    """The record of a run that finished before the stop (None: it must run again)."""
    import json

    try:
        found: dict[str, Any] = json.loads((run / RECORD).read_text(encoding="utf-8"))
        return found
    except (OSError, ValueError):
        return None


def save_record(run: Path, record: dict[str, Any]) -> None:
    """Mark ``run`` finished: its record, written atomically last."""
    from erasekit.atomic import atomic_write_files
    from erasekit.models import json_dumps

    atomic_write_files({run / RECORD: json_dumps(record).encode("utf-8")})


RECORD = "compare-record.json"


def compare_methods(
    model: str,
    concepts: str | Sequence[str],
    out: str | Path,
    methods: Sequence[str] | None = None,
    budget: str | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    suites: Sequence[str] | None = None,
    preserve: Sequence[str] = (),
    images_per_class: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    judge: str | None = None,
    device: str = "cpu",
    isolate: bool = True,
    progress: CompareProgress | None = None,
    command: str | None = None,
    attack: Mapping[str, Any] | None = None,
    seeds: int = 1,
    intervals: bool | None = None,
    allow_unknown: bool = False,
    resume: bool = False,
    variants: Mapping[str, tuple[str, Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Erase ``concepts`` with every method (default: all of the model's kind) under the same seeds; evaluate each; write OUT.

    ``variants`` maps a row name to (method, settings): one more row of that method with settings of its own
    (:mod:`erasekit.compare_rows`), e.g. ``{"esd-style": ("ear", {"windowed": False, "masking": False})}``; with
    variants and no ``methods`` only the variants run. The model may be a Janus (``toy-janus`` or a folder): its
    rows are autoregressive methods, and it is evaluated without sampler steps (``steps`` is refused).

    With ``seeds`` N > 1 every method is trained with seeds seed..seed+N-1 (paired across methods: the same
    seeds and the same evaluation images for all), in run folders METHOD-seedS; its row holds the per-seed
    results, the means and their 95 % intervals (:mod:`erasekit.eval.intervals`). ``intervals`` defaults to
    N > 1; asking for them with one seed is an error.

    OUT gets one run folder per method (as `erasekit erase` writes it, plus its eval-<suite>.json), cache/,
    logs/, compare.json, compare.md and report.html. ``budget`` defaults to each method's 'toy' preset on the
    toy model; ``overrides`` maps a method to settings on top of it. A failing method is recorded and skipped.
    ``attack`` (AttackConfig fields; ``{}`` for the defaults) also attacks every erased model on each concept with the
    same prompts and seeds (RUN/attack-<concept>/) and adds its success rate to the table. Concepts are checked as
    :func:`erasekit.erase` checks them (``allow_unknown`` as there), before anything loads. ``resume`` continues a
    comparison that was stopped: OUT must hold one made with the same settings; every run that finished (erased,
    evaluated, attacked: its ``compare-record.json``) is kept, the others are run again.
    """
    import torch

    from erasekit.eval.runner import evaluate
    from erasekit.eval.scorers import find_judge
    from erasekit.eval.suites import get_suite, resolve_settings
    from erasekit.methods import get_method, make_config

    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SEEDS:
        from erasekit.errors import SettingError

        raise SettingError("seeds", f"{{name}} must be a whole number >= 1 and <= {MAX_SEEDS} (training seeds per method, each a whole training), got {seeds!r}")
    intervals = seeds > 1 if intervals is None else intervals
    if intervals and seeds < 2:
        raise ErasekitError("an interval over training seeds needs at least 2 seeds; pass --seeds 2 or more (or drop --intervals)")
    targets = [concepts] if isinstance(concepts, str) else list(concepts)
    targets = [c.strip() for c in targets]
    if not targets or any(not c for c in targets):
        raise ErasekitError("empty concept; give a word or phrase such as 'circle'")
    from erasekit.concepts import check_targets

    preserve = [p.strip() for p in ([preserve] if isinstance(preserve, str) else preserve)]
    if any(not p for p in preserve):
        raise ErasekitError("empty preserve concept; give a word or phrase such as 'ring', or drop it")
    from erasekit.compare_rows import comparison_rows, override_targets, row_settings
    from erasekit.models import TOY_MODELS, model_family

    check_targets(targets, preserve, toy=model in TOY_MODELS, allow_unknown=allow_unknown)
    rows = comparison_rows(model, methods, variants)
    names = [row.name for row in rows]
    specs = {row.name: get_method(row.method) for row in rows}
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    if unknown := [m for m in overrides if m not in override_targets(rows)]:
        raise ErasekitError(f"settings given for {', '.join(unknown)}, which is not being compared; compared: {', '.join(names)}")
    janus = model_family(model) == "janus"
    if janus:
        from erasekit.eval.runner import check_janus_settings

        check_janus_settings(model, steps, None)  # no sampler steps
    if attack is not None:
        from erasekit.attack.plan import attack_settings

        attack_config = attack_settings(dict(attack), seed, steps, model if janus else None)  # bad settings refused before anything else
    fixed = [f"--set {m}.seed" for m, o in overrides.items() if "seed" in o] + [f"--variant {r.name}:seed" for r in rows if "seed" in r.settings]
    if seeds > 1 and fixed:
        raise ErasekitError(f"{fixed[0]} fixes the training seed, but --seeds {seeds} asks for {seeds} of them; drop one of the two")
    out = Path(out)
    if out.exists() and not resume:
        raise ErasekitError(f"{out} already exists; choose a new --out folder, remove it, or pass --resume to continue it")
    if resume and not (out / "compare.json").is_file():
        raise ErasekitError(f"--resume needs a comparison in {out} (its compare.json), but there is none; drop --resume to start one")
    if not out.parent.is_dir():
        raise ErasekitError(f"folder {out.parent} does not exist; create it first")
    if os.path.isdir(model):
        model = str(Path(model).resolve())  # runs are evaluated (and re-run) from any working folder
    budget = budget or ("toy" if model in TOY_MODELS else None)
    settings: dict[str, dict[str, Any]] = {}
    for row in rows:
        fields = {f.name for f in dataclasses.fields(specs[row.name].config_class)}
        settings[row.name] = row_settings(row, {"seed": seed} if "seed" in fields else {}, overrides)
        make_config(specs[row.name], budget, **settings[row.name])  # refuse bad settings before anything runs
    suite_names = list(dict.fromkeys(suites)) if suites else default_suites(targets)
    for suite in suite_names:
        resolved = resolve_settings(get_suite(suite), images_per_class=images_per_class, steps=steps, seed=seed, judge=judge)
        if get_suite(suite).scorer == "judge":
            find_judge(resolved.judge, model)
    plans = []
    if attack is not None:
        from erasekit.attack.plan import plan_attacks

        plans = plan_attacks(model, targets, judge, attack_config)
    tell = progress or (lambda label, done, total, info: None)
    eval_kwargs: dict[str, Any] = {"images_per_class": images_per_class, "steps": steps, "seed": seed, "judge": judge, "device": device,
                   "cache_dir": out / "cache", "command": command}

    def images(label: str) -> Callable[[str, int, int], None]:
        done: dict[str, int] = {}

        def tick(name: str, n: int, total: int) -> None:
            done[name] = done.get(name, 0) + n
            tell(f"{label} {name}", done[name], total, "images")

        return tick

    summary: dict[str, Any] = {
        "model": model, "concepts": targets, "preserve": list(preserve), "methods": names,
        **({"variants": variant_table} if (variant_table := {r.name: {"method": r.method, "settings": r.settings} for r in rows if r.is_variant}) else {}),
        "settings": settings, "budget": budget, "suites": suite_names,
        "seed": seed, "seeds": list(range(seed, seed + seeds)), "intervals": intervals, "images_per_class": images_per_class, "steps": steps, "judge": judge, "device": device, "isolate": isolate,
        "threads": torch.get_num_threads(), "command": command, "attack": dataclasses.asdict(plans[0].config) if plans else None,
        "notes": {"wall_s": "the erase() call alone (no imports, model load or saving)", "peak_rss_mib": "see each row's 'memory'",
                  **({"asr": "% of attack prompts whose erased-model image shows the concept with the adversarial prefix or without one",
                      "no_attack_rate": "% of attack prompts whose plain image shows the concept (base row: the base model's)"} if plans else {})},
        "base": {"metrics": {}, "generated": {}}, "rows": [], "report": None,
    }
    if resume:
        check_resumable(out, summary)
    else:
        out.mkdir()
    (out / "logs").mkdir(exist_ok=True)
    try:  # the base model's images, generated once into the shared cache
        for suite in suite_names:
            record = evaluate(model, suite, erased=targets, progress=images(suite), **eval_kwargs)
            summary["base"]["metrics"][suite] = _headline(record, "base")
            summary["base"]["generated"][suite] = record["generated"]["base"]
        if plans:
            from erasekit.attack.plan import make_base

            tell("attack base images", 0, len(plans), "")
            summary["base"]["attack"] = {plan.concept: make_base(plan, model, device) for plan in plans}
    except BaseException:
        if not resume:
            shutil.rmtree(out, ignore_errors=True)  # nothing ran yet: leave no half-made OUT behind
        raise
    _save(out, summary)
    for row in rows:
        name, own = row.name, {**overrides.get(row.method, {}), **row.settings, **overrides.get(row.name, {})}
        records = []
        for train_seed in range(seed, seed + seeds):
            run = name if seeds == 1 else f"{name}-seed{train_seed}"
            settings_s = {**settings[name], **({"seed": train_seed} if "seed" in settings[name] and "seed" not in own else {})}
            run_spec = {"model": model, "concepts": targets, "method": row.method, "out": str(out / run), "preserve": list(preserve), "budget": budget,
                    "settings": settings_s, "seed": train_seed, "device": device, "threads": torch.get_num_threads(), "allow_unknown": allow_unknown}
            record = {"method": name, **({"variant_of": row.method} if row.is_variant else {}), "run": run, "seed": train_seed,
                      "settings": settings_s, "metrics": {}, "generated": {}, "counts": {}}
            label = name if seeds == 1 else f"{name} seed {train_seed}"
            if resume and (done := finished_record(out / run)) is not None:
                tell(f"{label} (kept from the stopped comparison)", 1, 1, "")
                records.append(done)
                continue
            if resume:
                shutil.rmtree(out / run, ignore_errors=True)  # a run the stop cut short starts again
            erase_progress = lambda step, total, info, label=label: tell(f"{label} erase", step, total, info)  # noqa: E731
            try:
                record.update(_run_isolated(run_spec, out / "logs" / f"{run}.log", erase_progress) if isolate else _run_in_process(run_spec, erase_progress))
                record["wall_s"] = record.pop("erase_s")
                for suite in suite_names:
                    evaluation = evaluate(str(out / run), suite, progress=images(f"{label} {suite}"), **eval_kwargs)
                    record["metrics"][suite] = _headline(evaluation, "erased")
                    record["generated"][suite] = evaluation["generated"]
                    record["counts"][suite] = rate_counts(evaluation)
            except Exception as exc:  # noqa: BLE001  one method's failure must not lose the others' results
                record["error"] = one_line(exc)
            if plans and not record.get("error"):
                from erasekit.attack.plan import attack_row

                attack_row(record, out / run, model, plans, device, command, tell)
            if not record.get("error"):
                save_record(out / run, record)
            records.append(record)
            if record.get("error"):
                break
        summary["rows"].append(records[0] if seeds == 1 else aggregate(name, records, intervals))
        _save(out, summary)
    evaluated = [str(out / run["run"]) for r in summary["rows"] for run in r.get("per_seed", [r]) if not run.get("error")]
    if evaluated:
        from erasekit.eval.report import write_report

        write_report(evaluated, out / "report.html", comparison=summary if intervals else None, overwrite=resume)
        summary["report"] = "report.html"
    _save(out, summary)
    return summary


def compare(
    concept: list[str] = typer.Option(..., "--concept", "-c", help="Concept to erase (repeat for several)."),
    model: str = typer.Option("toy", "--model", "-m", help="'toy', 'toy-janus', a diffusers folder, a Janus folder, or a hub id."),
    methods: list[str] = typer.Option([], "--methods", help="Methods to compare, comma-separated or repeated (default: every one for the model's "
                                      "kind, diffusion or Janus; with --variant and no --methods: the variants alone)."),
    variant: list[str] = typer.Option([], "--variant", help=VARIANT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to create: one run per method, compare.md/.json, report.html."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Preset for every method: paper, fast, toy (default on --model toy)."),
    setting: list[str] = typer.Option([], "--set", help="A method's setting, METHOD.KEY=VALUE (repeatable), e.g. eap.iterations=50; "
                                      "on a method it applies to its variants too, VARIANT.KEY=VALUE to one variant."),
    suite: list[str] = typer.Option([], "--suite", "-s", help="Evaluation suite (repeatable; default: the toy suites that fit the concept)."),
    preserve: list[str] = typer.Option([], "--preserve", help="Concept every method keeps (repeatable)."),
    images_per_class: Optional[int] = typer.Option(None, "--images-per-class", help="Evaluation images per class (default: the suite's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Evaluation DDIM steps (default: the suite's; a Janus model has none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the evaluation images, and the first training seed of every method."),
    seeds: int = typer.Option(1, "--seeds", help="Training seeds per method (seed, seed+1, ...; paired across methods); 2 or more give 95 % intervals."),
    intervals: Optional[bool] = typer.Option(None, "--intervals/--no-intervals", help="Print 95 % intervals over the training seeds (default: with --seeds 2 or more)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Toy world's judge folder (default: beside the pipeline, else the shipped one)."),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    isolate: bool = typer.Option(True, "--isolate/--in-process", help="Run each erasure in its own process (honest peak memory) or in this one."),
    attack: bool = typer.Option(False, "--attack", help="Also attack every erased model (adversarial prompts, as `erasekit attack`); adds ASR to the table."),
    attack_set: list[str] = typer.Option([], "--attack-set", help="An attack setting, KEY=VALUE (repeatable), e.g. iterations=40, n_prompts=10."),
    allow_unknown: bool = typer.Option(False, "--allow-unknown", help="Accept a concept that looks like a mistake, as `erasekit erase --allow-unknown` does."),
    resume: bool = typer.Option(False, "--resume", help="Continue a stopped comparison in --out (same settings): finished runs are kept."),
) -> None:
    """Erase a concept with several methods under the same seeds, evaluate each, and write one comparison table."""
    from rich.console import Console

    from erasekit.run_display import progress_bar

    with user_errors():
        names = [n.strip() for item in methods for n in item.split(",") if n.strip()] if methods else None
        if methods and not names:
            raise ErasekitError("--methods is empty; name at least one method, separated by commas")
        from erasekit.compare_rows import parse_variants, settings_targets
        from erasekit.concepts import check_targets
        from erasekit.models import TOY_MODELS

        # as `erasekit erase` does, naming the flags (compare_methods checks again, naming its keywords; and refuses empty ones)
        check_targets([c.strip() for c in concept if c.strip()], [p.strip() for p in preserve if p.strip()], toy=model in TOY_MODELS,
                      allow_unknown=allow_unknown, cli=True)
        variants = parse_variants(variant)
        overrides = parse_settings(setting, settings_targets(model, names, variants))
        if attack_set and not attack:
            raise ErasekitError("--attack-set needs --attack")
        from erasekit.attack.plan import parse_attack_settings

        attack_settings = parse_attack_settings(attack_set) if attack else None
        console = Console(stderr=True)
        with progress_bar(console, "info") as bar:  # plain lines in a log file
            tasks: dict[str, Any] = {}

            def tick(label: str, done: int, total: Optional[int], info: str) -> None:
                if label not in tasks:
                    tasks[label] = bar.add_task(label, total=total, info=info)
                bar.update(tasks[label], completed=done, total=total, info=info)

            summary = compare_methods(model, concept, out, names, budget, overrides, suite or None, preserve, images_per_class, steps, seed, judge,
                              device, isolate, tick, " ".join(shlex.quote(a) for a in ["erasekit", *sys.argv[1:]]), attack_settings,
                              seeds, intervals, allow_unknown, resume, variants)
        typer.echo(markdown(summary))
        written = ", ".join(str(out / f) for f in ("compare.md", "compare.json", *(["report.html"] if summary["report"] else [])))
        console.print(f"wrote {written}")
        failed = [r["method"] for r in summary["rows"] if r.get("error")]
        if failed:
            console.print(f"{len(failed)} of {len(summary['rows'])} methods failed ({', '.join(failed)}); their errors are in the table and in {out / 'logs'}")
            raise typer.Exit(1)
