"""`erasekit spectrum`: the sensitivity spectrum (paper Fig. 2) and the score-difference analysis (Fig. 1).

For every concept of a set: its score on images from a prompt naming it (toy world: the judge's
probability of the concept's class, in %; real models: CLIP score), under the base and the erased model.
The drop (base − erased), sorted, is the spectrum; the drop against the concept's text-embedding distance
to the erased target is the Fig. 1 analysis (concepts close to the target suffer most).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.errors import ErasekitError
from erasekit.eval.suites import SEED_STRIDE, Plan, Scores, Settings, Suite
from erasekit.world.vocab import WorldVocab, load_vocab


def _article(text: str) -> str:
    return "an" if text[:1].lower() in "aeiou" else "a"


def toy_concept(word: str, vocab: WorldVocab) -> tuple[str, int] | None:
    """The judge head and class a toy-world word names (object, colour, style or the implicit concept), or None."""
    w = word.strip().lower()
    for i, obj in enumerate(vocab.objects):
        if w in vocab.object_synonyms(obj):
            return "object", i
    for i, colour in enumerate(vocab.colours):
        if w in vocab.colour_synonyms(colour):
            return "colour", i
    for i, style in enumerate(vocab.styles):
        if w == style or w in [a for a in vocab.raw["styles"][style]["adjectives"] if a]:
            return "style", i
    if w == vocab.implicit_name or w in vocab.indirect_words:
        return "implicit", 0
    return None


def toy_prompt(word: str, head: str, j: int, vocab: WorldVocab) -> str:
    """Image j's prompt naming ``word`` (objects and colours cycle so that only the concept is constant)."""
    obj = vocab.objects[j % len(vocab.objects)]
    colour = vocab.colours[(j // len(vocab.objects)) % len(vocab.colours)]
    if head == "object":
        return f"an image of {_article(word)} {word}"
    if head == "colour":
        return f"{_article(word)} {word} {obj}"
    if head == "style":
        return f"{_article(word)} {word} {colour} {obj}"
    if word == vocab.implicit_name:
        return f"{_article(colour)} {colour} {obj} with a {word}"
    return f"{_article(word)} {word} {colour} {obj}"


def plan_spectrum(concepts: Sequence[str], settings: Settings, toy: bool) -> Plan:
    """N images per concept; toy: labelled with the judge head/class the concept names."""
    vocab = load_vocab()
    prompts, seeds, groups, labels, heads = [], [], [], [], []
    unknown = [c for c in concepts if toy and toy_concept(c, vocab) is None]
    if unknown:
        raise ErasekitError(f"{', '.join(unknown[:5])} {'is' if len(unknown) == 1 else 'are'} not toy-world concepts; use words of the world (`--concepts toy` for all) or pass --clip DIR")
    for g, concept in enumerate(concepts):
        head, label = toy_concept(concept, vocab) if toy else ("clip", -1)  # type: ignore[misc]
        for j in range(settings.images_per_class):
            prompts.append(toy_prompt(concept, head, j, vocab) if toy else f"an image of {_article(concept)} {concept}")
            seeds.append(settings.seed + g * SEED_STRIDE + j)
            groups.append(concept)
            labels.append(label)
            heads.append(head)
    return Plan(prompts, seeds, [settings.guidance] * len(prompts), groups, labels, [], {"heads": heads})


def measure_spectrum(plan: Plan, scores: Scores) -> dict:
    """Per concept, the mean score (%) of its images: the judge's probability of its class, or the CLIP score."""
    per_image = np.empty(len(plan.prompts))
    for i, (head, label) in enumerate(zip(plan.extra["heads"], plan.labels)):
        if head == "clip":
            per_image[i] = scores["clip"][i]
        elif head == "implicit":
            per_image[i] = 100.0 * scores["implicit"][i]
        else:
            per_image[i] = 100.0 * scores[head][i, label]
    groups = np.asarray(plan.groups)
    return {"per_concept": {g: float(per_image[groups == g].mean()) for g in dict.fromkeys(plan.groups)}}


SPECTRUM = Suite("spectrum", "per-concept score drop from base to erased", {}, "judge", lambda s, c: plan_spectrum(c, s, True),
                 measure_spectrum, lambda plan, base, erased: {})


def spectrum_rows(base: dict[str, float], erased: dict[str, float], distance: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per concept, sorted by drop (largest first): base score, erased score, drop, distance to the target."""
    rows = [{"concept": c, "base": base[c], "erased": erased[c], "drop": base[c] - erased[c],
             "distance_to_target": (distance or {}).get(c)} for c in base]
    return sorted(rows, key=lambda r: (-r["drop"], r["concept"]))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None with fewer than 3 points or a constant side)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """The spectrum as CSV text."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["concept", "base", "erased", "drop", "distance_to_target"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()})
    return buf.getvalue()


def spectrum_plot(rows: list[dict[str, Any]], title: str, score_name: str) -> bytes:
    """Fig. 2 (sorted drops) and Fig. 1 (drop vs text distance to the target) side by side, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_dist = [r for r in rows if r["distance_to_target"] is not None]
    fig, axes = plt.subplots(1, 2 if with_dist else 1, figsize=(13 if with_dist else 8, 4.2), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(len(rows)), [r["drop"] for r in rows], color=["#c44" if r["drop"] > 0 else "#48c" for r in rows])
    ax.set_xticks(range(len(rows)), [r["concept"] for r in rows], rotation=90, fontsize=6 if len(rows) > 40 else 8)
    ax.set_ylabel(f"drop in {score_name} (base − erased)")
    ax.set_title(f"sensitivity spectrum: {title}")
    if with_dist:
        ax = axes[0][1]
        x, y = [r["distance_to_target"] for r in with_dist], [r["drop"] for r in with_dist]
        ax.scatter(x, y, s=12)
        for r in sorted(with_dist, key=lambda r: -abs(r["drop"]))[:10]:
            ax.annotate(r["concept"], (r["distance_to_target"], r["drop"]), fontsize=7)
        rho = spearman(x, y)
        ax.set_xlabel("text-embedding distance to the erased target")
        ax.set_ylabel(f"drop in {score_name}")
        ax.set_title("score difference vs closeness" + (f" (Spearman ρ = {rho:.2f})" if rho is not None else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def read_concepts(source: str) -> list[str]:
    """'toy' (every word of the toy world) or a file with one concept per line ('#' starts a comment)."""
    if source == "toy":
        return load_vocab().concept_words()
    path = Path(source)
    if not path.is_file():
        raise ErasekitError(f"no concepts file at {path}; pass --concepts FILE (one concept per line) or --concepts toy")
    words = [line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(w for w in words if w))


def text_distances(pipe: Any, targets: Sequence[str], concepts: Sequence[str]) -> dict[str, float]:
    """Each concept's smallest L2 distance (full text-encoder output) to any erased target."""
    from erasekit.concepts import distances, encode

    best = None
    for target in targets:
        d = distances(pipe, encode(pipe, [target])[0], list(concepts)).numpy()
        best = d if best is None else np.minimum(best, d)
    return {c: float(v) for c, v in zip(concepts, best)} if best is not None else {}


def spectrum(
    target: str,
    concepts: str | Sequence[str],
    model: str | None = None,
    out_dir: str | Path | None = None,
    images_per_concept: int = 8,
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 32,
    seed: int = 0,
    judge: str | None = None,
    clip: str | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Score every concept under the base and erased model; write spectrum.csv/.png/.json into ``out_dir`` (default: the run folder)."""
    from erasekit.eval.generate import GenerationCache, default_cache_dir
    from erasekit.eval.runner import resolve_target, run_suite, versions
    from erasekit.eval.scorers import clip_scorer, load_judge_scorer
    from erasekit.models import atomic_write_bytes, atomic_write_text, json_dumps, load_pipeline

    tgt = resolve_target(target, model)
    if tgt.result is None:
        raise ErasekitError(f"{target} is a base model; the spectrum needs an erased model: pass a run folder or a delta file")
    folder = Path(out_dir) if out_dir is not None else tgt.run_dir
    if folder is None:
        raise ErasekitError("pass --out DIR for the spectrum files (the default is the run folder, and TARGET is a delta file)")
    if not folder.is_dir():
        raise ErasekitError(f"folder {folder} does not exist; create it first")
    words = read_concepts(concepts) if isinstance(concepts, str) else list(dict.fromkeys(c.strip() for c in concepts if c.strip()))
    if not words:
        raise ErasekitError("no concepts given; pass --concepts FILE (one per line) or --concepts toy")
    settings = Settings(images_per_class=images_per_concept, steps=steps, guidance=guidance, batch_size=batch_size, seed=seed, judge=judge, clip=clip)
    from erasekit.checks import check_between

    check_between("images_per_concept", images_per_concept, 1, SEED_STRIDE, why="the seeds of one concept must not run into the next's")
    settings.validate()
    toy = clip is None
    plan = plan_spectrum(words, settings, toy)
    scorer = load_judge_scorer(settings, tgt.base) if toy else clip_scorer(clip, batch_size, device)
    pipe = load_pipeline(tgt.base, device=device)
    distance = text_distances(pipe, tgt.result.concepts, words)
    result = tgt.result
    result.check_fits(pipe, check_base=False)  # every key and hook setting fits: refuse before the base images (apply checks the base)
    models = {"base": pipe, "erased": lambda: result.apply(pipe, check_base=not force)}
    record, _ = run_suite(SPECTRUM, plan, models, scorer, settings, GenerationCache(cache_dir or default_cache_dir()), progress)
    rows = spectrum_rows(record["metrics"]["base"]["per_concept"], record["metrics"]["erased"]["per_concept"], distance)
    score_name = "judge probability (%)" if toy else "CLIP score"
    title = f"{result.method} erasing {', '.join(result.concepts)}"
    drops = [r["drop"] for r in rows]
    out = {"target": str(target), "model": tgt.base, "method": result.method, "concepts_erased": list(result.concepts),
           "score": score_name, "settings": {k: v for k, v in vars(settings).items()}, "scorer": scorer.info,
           "spearman_drop_vs_distance": spearman([r["distance_to_target"] for r in rows], drops), "rows": rows,
           "generated": record["generated"], "versions": versions()}
    atomic_write_text(folder / "spectrum.csv", rows_csv(rows))
    atomic_write_bytes(folder / "spectrum.png", spectrum_plot(rows, title, score_name))
    atomic_write_text(folder / "spectrum.json", json_dumps(out))
    return out
