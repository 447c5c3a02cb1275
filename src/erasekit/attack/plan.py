"""One attack set-up shared by many erased models (``compare --attack``): prompts, detector and base images made once.

Every run is attacked with the same prompts, seeds and settings, and the base model's images of the
prompts (the search's x0) are generated once, so the methods' attack success rates are comparable and
the base model's rate is one number.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.attack.detect import Detector, ToyConcept
from erasekit.errors import ErasekitError, SettingError


@dataclass
class AttackPlan:
    """One concept's attack: its prompts, detector and settings; ``base`` caches the base model's images of the prompts."""

    concept: str
    target: ToyConcept
    prompts: list[str]
    detector: Detector
    config: Any  # AttackConfig
    base: Any = field(default=None, repr=False)  # (latents or, on a Janus, image tokens; uint8 images) once made


def attack_settings(settings: dict[str, Any], seed: int, steps: int | None, janus: str | None = None) -> Any:
    """An AttackConfig from ``settings`` (its field names), with compare's seed and evaluation steps unless given there.

    ``janus`` names the model when it is a Janus: sampler steps and noise draws are refused and the guidance defaults to Janus-Pro's.
    """
    from erasekit.attack.run import AttackConfig

    known = {f.name for f in fields(AttackConfig)}
    if unknown := sorted(set(settings) - known):
        raise ErasekitError(f"unknown attack setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        if janus is not None:
            from erasekit.attack.janus_run import check_janus_attack

            guidance = check_janus_attack(janus, settings.get("steps"), settings.get("noise_draws"), settings.get("guidance"))
            config = replace(AttackConfig(**{"seed": seed, **settings}), guidance=guidance)
        else:
            config = AttackConfig(**{"seed": seed, **({"steps": steps} if steps is not None else {}), **settings})
        config.validate()
    except SettingError as exc:  # on the command line the setting was given as --attack-set NAME=VALUE
        raise SettingError(exc.setting, exc.text, f"--attack-set {exc.setting}") from None
    return config


def plan_attacks(model: str, concepts: list[str], judge: str | None, config: Any) -> list[AttackPlan]:
    """One plan per concept, on the toy world's judge; refuses concepts the toy world cannot judge before anything runs."""
    from erasekit.attack.detect import judge_detector, toy_concept, toy_prompts
    from erasekit.eval.scorers import find_judge

    plans = []
    for concept in concepts:
        try:
            target = toy_concept(concept)
        except ErasekitError as exc:
            raise ErasekitError(f"--attack judges images with the toy world's judge: {exc}") from None
        folder = find_judge(judge, model)
        plans.append(AttackPlan(concept, target, toy_prompts(target, config.n_prompts), judge_detector(folder, target, config.threshold), config))
    return plans


def folder_name(concept: str) -> str:
    """The attack's folder inside a run: attack-<concept> (as `erasekit attack` names it)."""
    return "attack-" + (re.sub(r"[^a-z0-9]+", "-", concept.lower()).strip("-") or "concept")


def make_base(plan: AttackPlan, model: str, device: str) -> dict[str, Any]:
    """Generate (once) the base model's images of the plan's prompts; returns the base model's rate of showing the concept."""
    from erasekit.attack.run import base_images
    from erasekit.models import load_pipeline, model_family

    if plan.base is None:
        if model_family(model) == "janus":  # the base image tokens are the search's target
            from erasekit.attack.janus_run import janus_base

            plan.base = janus_base(load_pipeline(model, device=device, autoregressive=True), plan.prompts, plan.config)
        else:
            plan.base = base_images(load_pipeline(model, device=device), plan.prompts, plan.config)
    shown = np.asarray(plan.detector.fn(plan.base[1])[0], dtype=bool)
    return {"base_rate": float(100.0 * shown.mean())}


def attack_run(run_dir: Path, model: str, plan: AttackPlan, device: str = "cpu", command: str | None = None, progress: Any = None) -> dict[str, Any]:
    """Attack the erased model in ``run_dir`` with ``plan``; write RUN/attack-<concept>/attack.json + .png; return the record."""
    from erasekit.attack.run import attack_pipeline, save_attack
    from erasekit.eval.runner import versions
    from erasekit.models import load_pipeline, model_family
    from erasekit.result import load_result

    started = time.perf_counter()
    make_base(plan, model, device)
    erased = load_result(run_dir / "delta.safetensors")
    if model_family(model) == "janus":
        from erasekit.attack.janus_run import attack_janus

        janus = load_pipeline(model, device=device, autoregressive=True)
        record, images = attack_janus(janus, erased, plan.concept, plan.prompts, plan.detector, plan.config, plan.target.words,
                                      progress=progress, base=plan.base)
    else:
        record, images = attack_pipeline(load_pipeline(model, device=device), erased, plan.concept, plan.prompts, plan.detector,
                                         plan.config, plan.target.words, progress=progress, base=plan.base)
    record = {"target": str(run_dir), "model": model, "delta": str(run_dir / "delta.safetensors"), **record,
              "command": command, "versions": versions(), "grid": "attack.png"}
    record["timings"]["wall_s"] = time.perf_counter() - started
    save_attack(record, images, run_dir / folder_name(plan.concept))
    return record


def parse_attack_settings(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (AttackConfig fields, dashes or underscores) -> {field: value} of the field's type."""
    from erasekit.attack.run import AttackConfig
    from erasekit.runs import parse_method_flags

    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not (eq and key.strip()):
            raise ErasekitError(f"--attack-set expects KEY=VALUE (e.g. iterations=40), got {item!r}")
        try:
            out.update(parse_method_flags(AttackConfig, [f"--{key.strip()}={value}"]))
        except ErasekitError as exc:
            raise ErasekitError(f"--attack-set {item!r}: {exc}") from None
    return out


def attack_row(row: dict[str, Any], run: Path, model: str, plans: list[AttackPlan], device: str, command: str | None,
               tell: Callable[[str, int, int | None, str], None]) -> None:
    """Attack one method's run on every planned concept (compare --attack); its rates (or one error line) go into ``row``."""
    from erasekit.errors import one_line

    row["attack"] = {}
    try:
        for plan in plans:
            label, steps = f"{row['method']} attack {plan.concept}", [plan.config.iterations]

            def search(phase: str, done: int, total: int, info: dict[str, float], label: str = label, steps: list[int] = steps) -> None:
                if phase == "search":  # one bar over every batch of prompts: its total is the last one reported
                    steps[0] = total
                    tell(label, min(done, total - 1), total, f"loss {info['loss']:.4g}" if "loss" in info else "")

            record = attack_run(run, model, plan, device, command, search)
            row["attack"][plan.concept] = {**record["metrics"], "wall_s": record["timings"]["wall_s"]}
            tell(label, steps[0], steps[0], f"ASR {record['metrics']['asr']:.0f}%")
    except Exception as exc:  # noqa: BLE001  an attack that fails keeps the method's other results
        row["attack_error"] = one_line(exc)
