"""Where an erasure's collateral lands: every class's top-1 rate after erasure, per method, over a comparison's seeds.

    python benchmarks/per_class.py runs/cmp-objects [runs/cmp-more ...] --versus eap:esd-x --versus eap:uce

Reads the folders of `erasekit compare` (``compare.json`` and each run's ``eval-SUITE.json``, whose per-class top-1
rates the suite's headline ESR and PSR average) and prints one markdown row per method: each class's mean rate (%)
over the training seeds, the base model's first; the erased class's column is its ESR-1 (images *not* read as it), every
other column the rate its images are still read as themselves, the class the methods took most from (summed drop
from the base) first. Each ``--versus A:B`` adds, per class, the paired difference A - B
over the seeds with its 95 % t interval and whether it resolves. Runs nothing; reads what a comparison wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load(folders: list[Path], suite: str) -> tuple[list[str], dict[str, float], dict[str, dict[str, list[float]]]]:
    """(erased classes, the base's per-class rates, {method: {class: per-seed rate of the erased model}}) from the folders."""
    base: dict[str, float] = {}
    erased: list[str] = []
    methods: dict[str, dict[str, list[float]]] = {}
    for folder in folders:
        try:
            summary = json.loads((folder / "compare.json").read_text())
        except (OSError, ValueError) as exc:
            _fail(f"cannot read {folder / 'compare.json'} ({exc}); pass the --out folder of a finished `erasekit compare`")
        if erased and summary.get("concepts") != erased:
            _fail(f"{folder} erased {summary.get('concepts')}, the first folder {erased}; pass comparisons of the same concept")
        erased = list(summary.get("concepts") or [])
        for row in summary.get("rows", []):
            if row.get("error") or row["method"] in methods:
                continue
            per_class: dict[str, list[float]] = {}
            for record in sorted(row.get("per_seed") or [row], key=lambda r: r.get("seed", 0)):
                path = folder / record["run"] / f"eval-{suite}.json"
                try:
                    metrics = json.loads(path.read_text())["metrics"]
                except (OSError, ValueError, KeyError) as exc:
                    _fail(f"cannot read the per-class rates in {path} ({exc}); was the comparison run with -s {suite}?")
                base = base or dict(metrics["base"]["per_class"]["top-1"])
                for cls, rate in metrics["erased"]["per_class"]["top-1"].items():
                    per_class.setdefault(cls, []).append(float(rate))
            methods[row["method"]] = per_class
    if not methods:
        _fail(f"no finished method in {', '.join(map(str, folders))}")
    return erased, base, methods


def table(base: dict[str, float], methods: dict[str, dict[str, list[float]]], classes: list[str], erased: list[str]) -> list[str]:
    """Markdown lines: one row per method of each class's mean rate over its seeds."""
    lines = ["| method | " + " | ".join(f"{c} (ESR-1)" if c in erased else c for c in classes) + " |", "| --- |" + " ---: |" * len(classes),
             "| base (no erasure) | " + " | ".join(f"{base[c]:.1f}" for c in classes) + " |"]
    for method, rates in methods.items():
        lines.append(f"| {method} | " + " | ".join(f"{sum(rates[c]) / len(rates[c]):.1f}" for c in classes) + " |")
    return lines


def versus(methods: dict[str, dict[str, list[float]]], pair: str, classes: list[str]) -> list[str]:
    """Per class, A - B paired over the seeds with its 95 % t interval and verdict."""
    from erasekit.eval.intervals import paired_difference, verdict

    a, _, b = pair.partition(":")
    if a not in methods or b not in methods:
        _fail(f"--versus {pair}: both sides must be methods of the comparison ({', '.join(methods)})")
    if len(methods[a][classes[0]]) < 2 or len(methods[a][classes[0]]) != len(methods[b][classes[0]]):
        _fail(f"--versus {pair} needs both methods on the same 2 or more training seeds")
    lines = [f"{a} - {b}, paired over {len(methods[a][classes[0]])} seeds:"]
    for c in classes:
        d = paired_difference(methods[a][c], methods[b][c])
        same = " (the same difference on every seed)" if d.lo == d.hi else ""
        lines.append(f"  {c}: {d.mean:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}] {verdict(d)}{same}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, read the comparisons, print the per-class table and the asked differences."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="--out folders of `erasekit compare` (methods on the same seeds)")
    parser.add_argument("--suite", default="toy-objects", help="the suite whose per-class rates to read (default toy-objects)")
    parser.add_argument("--versus", action="append", default=[], help="A:B, print A - B per class paired over the seeds (repeatable)")
    args = parser.parse_args(argv)
    for pair in args.versus:
        if pair.count(":") != 1 or not all(pair.split(":")):
            _fail(f"--versus takes METHOD:METHOD, got {pair!r}")
    erased, base, methods = load(args.folders, args.suite)
    kept = sorted((c for c in base if c not in erased), key=lambda c: (sum(sum(r[c]) / len(r[c]) - base[c] for r in methods.values()), c))
    classes = [c for c in base if c in erased] + kept  # the erased first, then the most taken
    print("\n".join(table(base, methods, classes, erased)))
    for pair in args.versus:
        print("\n".join(versus(methods, pair, classes)))


if __name__ == "__main__":
    main()
