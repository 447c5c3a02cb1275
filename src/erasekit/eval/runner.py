"""Run a suite on a base model and its erased version in the same run, and save the JSON and image grid."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from diffusers import DiffusionPipeline

from erasekit.distributed import distributed, gather_rows, is_main_process, resolve_device, shard
from erasekit.errors import ErasekitError, SettingError
from erasekit.eval.generate import GenerationCache, default_cache_dir, generate_cached
from erasekit.eval.scorers import Scorer, load_scorer
from erasekit.eval.suites import SEED_STRIDE, Plan, Settings, Suite, get_suite, resolve_settings
from erasekit.hooks import generation_hash
from erasekit.models import json_dumps
from erasekit.result import ErasureResult, load_result

# progress(model label, images just finished, images in total for that model)
EvalProgress = Callable[[str, int, int], None]
# a diffusers pipeline (typed Any: its components are set at run time), or a callable that makes one
PipeSource = Any | Callable[[], Any]
GRID_ROWS, GRID_COLUMNS = 10, 4


@dataclass(frozen=True)
class Target:
    """What ``erasekit evaluate TARGET`` names: a base model, or a delta (file or run folder) and its base."""

    base: str
    delta: Path | None = None
    run_dir: Path | None = None
    result: ErasureResult | None = None


def resolve_target(target: str, model: str | None = None) -> Target:
    """A base model ('toy', a diffusers folder, a hub id), a delta file, or a run folder with delta.safetensors + run.json."""
    from erasekit.checks import usable_path

    path = usable_path(target, "TARGET")
    if path.is_dir() and (path / "delta.safetensors").is_file():
        base = model
        if base is None:
            try:
                base = json.loads((path / "run.json").read_text(encoding="utf-8"))["model"]
            except (OSError, ValueError, KeyError):
                raise ErasekitError(f"{path}/run.json is missing or names no base model; pass --model") from None
        return Target(str(base), path / "delta.safetensors", path, load_result(path / "delta.safetensors"))
    if path.is_file() and path.suffix == ".safetensors":
        result = load_result(path)
        base = model or result.base_model_id
        if not base or base == "unknown":
            raise ErasekitError(f"{path} does not say which base model it was made from; pass --model")
        return Target(base, path, None, result)
    if path.is_dir() and not (path / "model_index.json").is_file():
        from erasekit.models import is_janus_folder

        if is_janus_folder(path):
            if model is not None and model != target:
                raise ErasekitError(f"TARGET {target!r} is a base model; --model is only for deltas")
            return Target(target)  # a Janus base model folder
        raise ErasekitError(f"{path} is neither a run folder (delta.safetensors) nor a diffusers pipeline folder (model_index.json)")
    if path.is_file():
        raise ErasekitError(f"{path} is not a delta (.safetensors) file; pass a run folder, a delta file or a base model")
    if model is not None and model != target:
        raise ErasekitError(f"TARGET {target!r} is a base model; --model is only for deltas")
    return Target(target)


def _pipe(source: PipeSource) -> Any:
    from erasekit.autoregressive.janus import Janus

    return source if isinstance(source, (DiffusionPipeline, Janus)) else source()


def run_suite(
    suite: Suite,
    plan: Plan,
    models: Mapping[str, PipeSource],
    scorer: Scorer,
    settings: Settings,
    cache: GenerationCache,
    progress: EvalProgress | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Generate (cached) and score the plan for every model in order; compare 'erased' with 'base' when both ran.

    A model may be given as a callable, so that the base is fully generated before a delta is applied to it.
    Returns the JSON-able record and the images per model.
    """
    record: dict[str, Any] = {"metrics": {}, "generated": {}, "model_hash": {}, "paths": {}}
    scores, images = {}, {}
    for name, source in models.items():
        pipe = _pipe(source)
        model_hash = generation_hash(pipe)  # a hook changes the images but not the weights
        tick = (lambda n, name=name: progress(name, n, len(plan.prompts))) if progress else None
        gen = generate_cached(pipe, plan.prompts, plan.seeds, cache, settings.steps, plan.guidance, settings.batch_size, tick, model_hash)
        scores[name] = score_sharded(scorer, gen.images, gen.paths, plan, pipe.device)
        images[name] = gen.images
        record["metrics"][name] = suite.measure(plan, scores[name])
        record["generated"][name] = gen.generated
        record["model_hash"][name] = model_hash
        record["paths"][name] = [str(p) for p in gen.paths]
    if "base" in scores and "erased" in scores:
        record["comparison"] = suite.compare(plan, scores["base"], scores["erased"])
    return record, images


def score_sharded(scorer: Scorer, images: np.ndarray, paths: Sequence[Path], plan: Plan, device: Any = "cpu") -> dict[str, np.ndarray]:
    """Score every image; under `accelerate launch` each process scores one contiguous block and every process gets all rows."""
    rank, world, _ = distributed(cpu=getattr(device, "type", str(device)) == "cpu")
    if world <= 1:
        return scorer(images, paths, plan)
    rows = shard(len(plan.prompts), rank, world)
    sliced = {f: getattr(plan, f)[rows.start : rows.stop] for f in ("prompts", "seeds", "guidance", "groups", "labels")}
    part = Plan(**sliced, erased=plan.erased, extra=plan.extra)
    local = scorer(images[rows.start : rows.stop], list(paths)[rows.start : rows.stop], part)
    return gather_rows(local, len(plan.prompts), rank, world, device=_collective_device(device))


def _collective_device(device: Any) -> Any:
    """Where gathered tensors live: the process's GPU for NCCL, the CPU for gloo."""
    return device if getattr(device, "type", "cpu") == "cuda" else "cpu"


def versions() -> dict[str, str]:
    """Versions of everything that decides a number."""
    import diffusers
    import scipy
    import torch
    import transformers

    from erasekit import __version__

    return {"erasekit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "scipy": scipy.__version__, "python": platform.python_version()}


def grid_image(plan: Plan, images: Mapping[str, np.ndarray], titles: Mapping[str, str]) -> Any:
    """Base | erased panels via erasekit.grid: one row per group (erased groups first), its first few images."""
    from erasekit.grid import prompt_grid

    members: dict[str, list[int]] = {}
    for i, group in enumerate(plan.groups):
        members.setdefault(group, []).append(i)
    order = sorted(members, key=lambda g: g not in plan.erased)[:GRID_ROWS]
    per = min(GRID_COLUMNS, *(len(members[g]) for g in order))
    index = [i for g in order for i in members[g][:per]]
    # a row is labelled by its prompt when the group has one prompt, else by the group (e.g. a style)
    labels = [plan.prompts[members[g][0]] if len({plan.prompts[i] for i in members[g]}) == 1 else g for g in order]
    if set(plan.erased) != set(plan.groups):  # mark erased rows, unless every row is (toy-implicit, i2p, t2isafety)
        labels = [f"[erased] {label}" if g in plan.erased else label for g, label in zip(order, labels)]
    return prompt_grid(labels, per, [(titles.get(n, n), imgs[index]) for n, imgs in images.items()])


def evaluate(
    target: str | Path | ErasureResult | Any,
    suite: str = "toy-objects",
    model: str | Any | None = None,
    out_json: str | Path | None = None,
    images_per_class: int | None = None,
    cache_dir: str | Path | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    judge: str | None = None,
    classifier: str | None = None,
    clip: str | None = None,
    prompts: str | None = None,
    evaluator: str | None = None,
    categories: str | None = None,
    erased: Sequence[str] | None = None,
    device: str = "cpu",
    force: bool = False,
    command: str | None = None,
    progress: EvalProgress | None = None,
) -> dict[str, Any]:
    """Evaluate TARGET with a suite, base and erased model in the same run; returns the JSON-able result.

    TARGET is a run folder, a delta file or a base model name (as on the command line), an :class:`ErasureResult`,
    or a pipeline (a base model alone); ``model`` is the base of a delta: a name or a pipeline, which is left as it was.
    The result is saved as RUN/eval-<suite>.json (+ .png grid) when TARGET is a run folder, and at ``out_json``.
    ``erased`` names the erased concepts for a base model alone (or overrides the delta's).
    """
    spec = get_suite(suite)
    device = resolve_device(device)
    from erasekit.eval.targets import check_keywords, describe, kept_as_it_was, resolve_any

    erased = check_keywords(out_json, cache_dir, erased)
    tgt, given_pipe = resolve_any(target, model)
    janus = autoregressive_target(tgt.base, given_pipe)
    if janus:
        guidance = check_janus_settings(tgt.base, steps, guidance)
    settings = resolve_settings(spec, images_per_class=images_per_class, steps=steps, guidance=guidance, batch_size=batch_size,
                                seed=seed, judge=judge, classifier=classifier, clip=clip, prompts=prompts,
                                evaluator=evaluator, categories=categories)
    if janus:
        from erasekit.eval.generate import JANUS_STEPS

        settings = replace(settings, steps=JANUS_STEPS)  # recorded as it is: a Janus has no sampler steps
    if out_json is not None and Path(out_json).suffix != ".json":
        raise SettingError("out_json", f"{{name}} must name a .json file, got {out_json}", flag="--json")
    if out_json is not None and not Path(out_json).parent.is_dir():
        raise ErasekitError(f"folder {Path(out_json).parent} does not exist; create it first")
    concepts = list(erased) if erased else list(tgt.result.concepts if tgt.result else [])
    plan = spec.plan(settings, concepts)
    scorer = load_scorer(spec, settings, tgt.base, device)
    from erasekit.models import load_pipeline

    pipe = given_pipe if given_pipe is not None else load_pipeline(tgt.base, device=device, autoregressive=True)
    models: dict[str, PipeSource] = {"base": pipe}
    result = tgt.result
    if result is not None:
        result.check_fits(pipe, check_base=False)  # every key and hook setting fits: refuse before the base images (apply checks the base)
        models["erased"] = lambda: result.apply(pipe, check_base=not force)
    cache = GenerationCache(cache_dir or default_cache_dir())
    if (extend := getattr(spec, "extend_scorer", None)) is not None:  # a suite that also scores against references of its own (toy-safety)
        scorer = extend(scorer, settings, tgt.base, pipe, cache.folder)
    with kept_as_it_was(given_pipe, result):  # a caller's pipeline comes back unerased
        record, images = run_suite(spec, plan, models, scorer, settings, cache, progress)
    out = {
        "suite": spec.name, "summary": spec.summary, "target": describe(target), "model": tgt.base,
        "delta": str(tgt.delta) if tgt.delta else None, "method": result.method if result else None,
        "concepts": concepts, "erased": plan.erased if spec.name not in ("toy-implicit", "i2p", "t2isafety") else [],
        "settings": asdict(settings), "sampler": JANUS_SAMPLER if janus else "ddim", "command": command, "scorer": scorer.info, "versions": versions(),
        "seeds": {"seed": settings.seed, "rule": plan.extra.get("seed_rule")
                  or (f"image j of group g uses seed + {SEED_STRIDE} g + j" if spec.name != "i2p" else "evaluation_seed + j")},
        "cache": str(cache.folder), **{k: v for k, v in record.items() if k != "paths"},
        "images": [
            {"prompt": p, "seed": s, "guidance": g, "group": grp, **{name: paths[i] for name, paths in record["paths"].items()}}
            for i, (p, s, g, grp) in enumerate(zip(plan.prompts, plan.seeds, plan.guidance, plan.groups))
        ],
    }
    titles = {"base": f"base ({tgt.base})", "erased": f"{result.method}: erased {', '.join(result.concepts)}" if result else "erased"}
    grid = grid_image(plan, images, titles)
    destinations = [tgt.run_dir / f"eval-{spec.name}.json"] if tgt.run_dir else []
    destinations += [Path(out_json)] if out_json is not None else []
    if is_main_process():  # under `accelerate launch`, the main process writes
        for dest in destinations:
            save_evaluation(out, grid, dest)
    return out


JANUS_SAMPLER = "janus: image tokens drawn one by one, CFG on their logits, temperature 1 (no steps)"


def autoregressive_target(base: str, given: Any) -> bool:
    """Whether an evaluation runs on a Janus (autoregressive) model: the loaded model given, else the base model's name."""
    from erasekit.eval.generate import is_autoregressive
    from erasekit.models import model_family

    return is_autoregressive(given) if given is not None else model_family(base) == "janus"


def check_janus_settings(model: str, steps: int | None, guidance: float | None) -> float:
    """Refuse, in one line, a setting a Janus has no use for (sampler steps); the guidance it takes (default: Janus-Pro's 5)."""
    if steps is not None:
        raise SettingError("steps", f"{{name}} sets a diffusion sampler's steps; {model} is a Janus (autoregressive) model, which draws one "
                           "token per image position: drop {name}")
    from erasekit.panels import JANUS_GUIDANCE

    return JANUS_GUIDANCE if guidance is None else guidance


def save_evaluation(record: dict[str, Any], grid: Any, dest: Path) -> None:
    """Write the JSON and its grid PNG (same stem): both or neither."""
    from erasekit.atomic import atomic_write_files, png_bytes

    if not dest.parent.exists():
        raise ErasekitError(f"folder {dest.parent} does not exist; create it first")
    png = dest.with_suffix(".png")
    atomic_write_files({png: png_bytes(grid), dest: json_dumps({**record, "grid": png.name}).encode("utf-8")})
