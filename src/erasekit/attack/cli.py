"""Typer command `attack` (registered into the main app with ``app.command()(attack)``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from erasekit.run_display import progress_bar
from erasekit.world.cli import user_errors

status = Console(stderr=True)


def attack(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="An erased model: a run folder from `erasekit erase`, or a delta file."),
    concept: str = typer.Option(..., "--concept", "-c", help="The erased concept to bring back (toy: an object, a style or 'skull')."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for attack.json and attack.png (default: RUN/attack-<concept>)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model of a delta (default: the one run.json or the delta names)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line (needed on real models)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="Toy world's judge folder (default: beside the pipeline, else the shipped one)."),
    classifier: Optional[str] = typer.Option(None, "--classifier", help="Real models: local transformers image classifier folder (with --label)."),
    label: Optional[int] = typer.Option(None, "--label", help="The concept's class index in --classifier."),
    nudenet: bool = typer.Option(False, "--nudenet", help="Real models: detect the concept with NudeNet (pip install 'erasekit[nudenet]')."),
    device: str = typer.Option("cpu", "--device", help="Torch device."),
    force: bool = typer.Option(False, "--force", help="Apply the delta even if its base hash differs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier attack.json in --out."),
    show_settings: bool = typer.Option(False, "--show-settings", help="Print the attack's settings (each is a flag) and exit."),
) -> None:
    """Search adversarial prompts that bring an erased concept back (UnlearnDiffAtk style); print the attack success rate.

    Runs on diffusion models and on Janus (autoregressive) ones; on Janus the loss is the base image tokens' cross-entropy.

    The attack's settings are flags too (--n-prompts 20 --tokens 5 --iterations 40 --seed 0 ...; --show-settings lists them).
    """
    with user_errors():
        from erasekit.attack.run import AttackConfig
        from erasekit.attack.run import attack as run_attack
        from erasekit.eval.cli import _print_settings
        from erasekit.runs import parse_method_flags

        given = parse_method_flags(AttackConfig, list(ctx.args))
        if show_settings:
            _print_settings(AttackConfig, {**given, **_janus_settings(target, model, given)})
            return

        with progress_bar(status, "info") as bar:  # plain lines in a log file
            tasks: dict[str, Any] = {}

            def tick(phase: str, done: int, total: int, info: dict[str, float]) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total, info="")
                text = f"loss {info['loss']:.4g} best {info['best_loss']:.4g}" if "loss" in info else ""
                bar.update(tasks[phase], completed=done, total=total, info=text)

            result = run_attack(
                target, concept, model=model, judge=judge, out=out, prompts=prompts, classifier=classifier, label=label, nudenet=nudenet,
                device=device, force=force, overwrite=overwrite, command=" ".join(shlex.quote(a) for a in ["erasekit", *sys.argv[1:]]),
                progress=tick, **given,
            )
    console = Console()
    console.print(attack_table(result))
    best = sorted(result["prompts"], key=lambda p: p["best_loss"])[:3]
    for p in best:
        console.print(f"  {p['adversarial_prompt']!r}  (loss {p['initial_loss']:.4g} -> {p['best_loss']:.4g}, plain {p['plain_loss']:.4g})")
    status.print(f"wrote {Path(result['out']) / 'attack.json'} and attack.png")


def _janus_settings(target: str, model: Optional[str], given: dict[str, Any]) -> dict[str, Any]:
    """What a Janus target's attack uses instead of the diffusion defaults (no steps or noise draws, guidance 5); nothing for another target."""
    from erasekit.errors import ErasekitError
    from erasekit.eval.runner import autoregressive_target, resolve_target

    try:
        janus = autoregressive_target(resolve_target(target, model).base, None)
    except ErasekitError:  # an unusable target is refused when the attack runs, not when its settings are listed
        return {}
    if not janus:
        return {}
    from erasekit.panels import JANUS_GUIDANCE

    return {"steps": 0, "noise_draws": 0, "guidance": given.get("guidance", JANUS_GUIDANCE)}


def attack_table(result: dict[str, Any]) -> Table:
    """The attack's rates: ASR beside the no-attack and base rates."""
    m = result["metrics"]
    table = Table(title=f"attack on {result['method']} (erased: {', '.join(result['erased'])}), concept {result['concept']!r}, "
                        f"{len(result['prompts'])} prompts, detector: {result['detector'].get('rule', '')}")
    for name in ("ASR %", "adversarial only %", "no attack %", "base model %"):
        table.add_column(name, justify="right")
    table.add_row(*(f"{m[k]:.1f}" for k in ("asr", "adversarial_rate", "no_attack_rate", "base_rate")))
    return table
