"""`erasekit itd classify`: ItD's sparse autoencoder as a zero-shot "does this prompt carry the concept?" classifier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from erasekit.world.cli import user_errors

itd_app = typer.Typer(help="ItD's sparse autoencoder: classify prompts by the concept an itd delta erases.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)


def toy_prompt_sets(concept: str, seed: int = 12345, per_group: int = 60) -> dict[str, list[str]]:
    """Toy prompts that name the concept, paraphrase it (its synonyms in captions), and do not mention it.

    Drawn with a seed the SAE's corpus does not use (ItD's toy preset draws its corpus with the run seed, 0 by default).
    """
    import numpy as np

    from erasekit.world.captions import caption, sample_example
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    if concept not in vocab.objects:
        raise ValueError(f"the toy report covers the toy world's objects ({', '.join(vocab.objects)}); got {concept!r}")
    synonyms = vocab.object_synonyms(concept)
    rng = np.random.default_rng(seed)
    named = [f"an image of a {concept}", f"a {concept}", f"a photo of a {concept}"]
    paraphrased: list[str] = []
    without: list[str] = []
    while min(len(named), len(paraphrased), len(without)) < per_group:
        scene, kind = sample_example(rng, 0, vocab)
        text = caption(scene, kind, rng, vocab)
        words = text.split()
        if scene.object != concept and not any(s in words for s in synonyms):
            without.append(text)
        elif scene.object == concept and concept in words:
            named.append(text)
        elif scene.object == concept and any(s in words for s in synonyms[1:]):
            paraphrased.append(text)
    return {"named": named[:per_group], "paraphrased": paraphrased[:per_group], "not mentioned": without[:per_group]}


@itd_app.command()
def classify(
    delta: Path = typer.Argument(..., help="An itd delta: the run folder of `erasekit erase --method itd`, or its delta file."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt to classify (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="Text file, one prompt per line."),
    toy_report: bool = typer.Option(False, "--toy-report", help="Toy world: accuracy on prompts that name, paraphrase and do not mention the concept."),
    model: str = typer.Option("toy", "--model", "-m", help="The delta's base model: 'toy', a diffusers folder, or a hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout instead of a table."),
) -> None:
    """Say for each prompt whether it carries the concept the itd delta erases (its share of SAE activation mass)."""
    with user_errors():
        from erasekit.errors import ErasekitError
        from erasekit.methods.itd import classify as run_classify
        from erasekit.models import load_pipeline
        from erasekit.result import load_result

        result = load_result(delta / "delta.safetensors" if delta.is_dir() else delta)
        if result.kind != "hook" or result.hook.get("type") != "itd":
            raise ErasekitError(f"{delta} holds a {result.method} delta, not an itd one; pass the delta `erasekit erase --method itd` wrote")
        prompts = [p.strip() for p in prompt]
        if prompts_file is not None:
            try:
                prompts += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise ErasekitError(f"cannot read {prompts_file} ({exc.__class__.__name__}); pass a text file, one prompt per line") from None
        groups: dict[str, list[str]] = {}
        if toy_report:
            try:
                groups = toy_prompt_sets(result.concepts[0])
            except ValueError as exc:
                raise ErasekitError(str(exc)) from None
        if not prompts and not groups:
            raise ErasekitError("no prompt given; pass --prompt TEXT, --prompts-file FILE or --toy-report")
        if any(not p for p in prompts):
            raise ErasekitError("an empty prompt was given; every --prompt needs text")
        pipe = load_pipeline(model)
        result.check_fits(pipe)
        rows = run_classify(pipe, result, prompts) if prompts else []
        report = {"concepts": list(result.concepts), "threshold": result.hook["settings"]["threshold"],
                  "prompts": [{"prompt": p, "share": round(s, 4), "carries": c} for p, s, c in rows]}
        for name, texts in groups.items():
            flags = [c for _, _, c in run_classify(pipe, result, texts)]
            right = sum(f == (name != "not mentioned") for f in flags)
            report.setdefault("toy_report", {})[name] = {"prompts": len(texts), "accuracy": round(100 * right / len(texts), 1)}
        if as_json:
            typer.echo(json.dumps(report, indent=2))
            return
        table = Table("prompt", "share", f"carries {', '.join(result.concepts)}?")
        for p, s, c in rows:
            table.add_row(p, f"{s:.3f}", "yes" if c else "no")
        for name, info in report.get("toy_report", {}).items():
            table.add_row(f"[toy report] {name} ({info['prompts']} prompts)", "", f"{info['accuracy']:.1f} % right")
        Console().print(table)
