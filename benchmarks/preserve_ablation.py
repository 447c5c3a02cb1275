"""The paper's ablation of the preserved concept (EAP, its tables on the choice of c_a), rerun on the toy world.

    python benchmarks/preserve_ablation.py --seeds 3 --images-per-class 32
    python benchmarks/preserve_ablation.py --model DIR --concept square --choices adversarial,none --seeds 2

EAP is trained with ``--preserve-choice`` adversarial (the Gumbel search), random (a uniform draw from the same
candidates every step), nearest (the candidate closest to the target, fixed) and none (no preservation term), on the
same paired training seeds, and judged on the same evaluation images (toy-objects). Prints ESR-1/ESR-5/PSR-1/PSR-5
with 95 % intervals over seeds, then each choice's paired PSR-1 and ESR-1 difference from adversarial, with its
interval and whether it resolves. The paper's claim: adversarial preserves best at a comparable erasure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEYS = ("ESR-1", "ESR-5", "PSR-1", "PSR-5")


def run(model: str, concept: str, choices: list[str], seeds: int, images_per_class: int, settings: dict[str, Any], log: Any,
        cache_dir: Path | None = None) -> dict[str, Any]:
    """Train every (choice, seed) and evaluate it; returns per-seed rates, their intervals and the paired differences."""
    from erasekit.api import erase
    from erasekit.compare_seeds import rate_counts
    from erasekit.eval.intervals import paired_difference, rate_interval, verdict
    from erasekit.eval.runner import evaluate
    from erasekit.models import load_pipeline

    out: dict[str, Any] = {"model": model, "concept": concept, "seeds": list(range(seeds)), "images_per_class": images_per_class, "choices": {}}
    with tempfile.TemporaryDirectory() as tmp:
        counts: dict[str, int] = {}
        for choice in choices:
            per_seed: list[dict[str, Any]] = []
            for seed in range(seeds):
                started = time.perf_counter()
                result = erase(load_pipeline(model), concept, method="eap", budget="toy" if model == "toy" else None, seed=seed,
                               preserve_choice=choice, release_unused=True, **settings)
                wall = time.perf_counter() - started
                delta = Path(tmp) / f"{choice}-{seed}.safetensors"
                result.save(delta)
                record = evaluate(str(delta), "toy-objects", model=model, images_per_class=images_per_class, cache_dir=cache_dir or Path(tmp) / "cache")
                counts = rate_counts(record)
                head = record["metrics"]["erased"]["headline"]
                per_seed.append({"seed": seed, "wall_s": round(wall, 1), **{k: head[k] for k in KEYS}})
                log(f"{choice:11s} seed {seed}: " + ", ".join(f"{k} {head[k]:.1f}" for k in KEYS) + f" ({wall:.0f} s)")
            entry: dict[str, Any] = {"per_seed": per_seed}
            if seeds > 1:
                entry["intervals"] = {k: rate_interval([r[k] for r in per_seed], counts.get(k[:3])).as_dict() for k in KEYS}
            out["choices"][choice] = entry
        if seeds > 1 and "adversarial" in out["choices"]:
            ref = out["choices"]["adversarial"]["per_seed"]
            for choice, entry in out["choices"].items():
                if choice == "adversarial":
                    continue
                for key in ("PSR-1", "ESR-1"):
                    diff = paired_difference([r[key] for r in entry["per_seed"]], [r[key] for r in ref])
                    entry[f"{key} minus adversarial"] = {**diff.as_dict(), "verdict": verdict(diff)}
    return out


def table(summary: dict[str, Any]) -> str:
    """Markdown: one row per choice, means [95 % interval] over seeds, then the paired differences from adversarial."""
    lines = ["| preserved concept | " + " | ".join(KEYS) + " | PSR-1 − adversarial | ESR-1 − adversarial |",
             "| --- | " + " | ".join("---:" for _ in KEYS) + " | ---: | ---: |"]
    for choice, entry in summary["choices"].items():
        spans = entry.get("intervals", {})
        cells = [f"{s['mean']:.1f} [{s['lo']:.1f}, {s['hi']:.1f}]" if (s := spans.get(k)) else f"{entry['per_seed'][0][k]:.1f}" for k in KEYS]
        diffs = [(f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] {d['verdict']}" if (d := entry.get(f"{k} minus adversarial")) else "–")
                 for k in ("PSR-1", "ESR-1")]
        lines.append(f"| {choice} | " + " | ".join(cells + diffs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--choices", default="adversarial,random,nearest,none")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images-per-class", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], help="An EAP setting KEY=VALUE on top of the toy preset (repeatable).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="Generation cache to share (e.g. a compare run's OUT/cache: its base images and any identical model's images are reused).")
    args = parser.parse_args(argv)
    from erasekit.errors import ErasekitError
    from erasekit.methods import get_method
    from erasekit.runs import parse_method_flags

    try:
        if args.seeds < 1 or args.images_per_class < 1:
            raise ErasekitError("--seeds and --images-per-class must be >= 1")
        settings = parse_method_flags(get_method("eap").config_class, [f"--{item}" for item in args.set])
        choices = [c.strip() for c in args.choices.split(",") if c.strip()]
        summary = run(args.model, args.concept, choices, args.seeds, args.images_per_class, settings, lambda m: print(m, file=sys.stderr, flush=True),
                      args.cache_dir)
    except ErasekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(json.dumps({c: {k: round(v["mean"], 2) for k, v in e.get("intervals", {}).items()} for c, e in summary["choices"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
