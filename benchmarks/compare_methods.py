"""Erase one toy object class with every registered method and check the shape the EAP paper reports (Table 1).

    python benchmarks/compare_methods.py                      # circle, every method, toy presets, 50 images/class
    python benchmarks/compare_methods.py --concept square --methods esd-x,uce,eap --images-per-class 20

Prints the comparison table (also in OUT/compare.md, OUT/report.html), then the paper's shape on Imagenette
(ESR-1/PSR-1 %: ESD-x 78.1/53.3, UCE 100/24.4, EAP 98.6/55.2): UCE-like methods erase hardest, ESD-x
preserves neighbours better than UCE, and EAP's ESR-1 is within a few points of the best while its PSR-1 stays
above ESD-x's. The checks are printed, not asserted: if the toy world disagrees, report what was measured.
Needs the shipped toy model (or --model DIR with a judge/ beside it, or --judge). Tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

WITHIN = 5.0  # points: "EAP's ESR-1 within a few points of the best"
UCE_LIKE = ("uce", "rece")


def _values(row: dict[str, Any], key: str) -> list[float] | None:
    """Per-seed values of a toy-objects rate (one value without --seeds)."""
    runs = row.get("per_seed") or [row]
    values = [r.get("metrics", {}).get("toy-objects", {}).get(key) for r in runs]
    return [float(v) for v in values] if all(isinstance(v, (int, float)) for v in values) and values else None


def paper_shape(summary: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(claim, holds / does not / None when it cannot be judged or the difference does not resolve, the numbers behind it).

    With several seeds a pairwise claim is judged on the paired difference over seeds and its 95 % interval: a
    difference whose interval holds 0 is "no difference" (None), not a win for either side.
    """
    from erasekit.eval.intervals import paired_difference, verdict

    rows = {r["method"]: r for r in summary["rows"] if not r.get("error")}
    esr = {m: v for m, r in rows.items() if (v := _values(r, "ESR-1")) is not None}
    psr = {m: v for m, r in rows.items() if (v := _values(r, "PSR-1")) is not None}
    mean = {k: {m: sum(v) / len(v) for m, v in table.items()} for k, table in (("ESR-1", esr), ("PSR-1", psr))}
    checks: list[tuple[str, bool | None, str]] = []
    if esr:
        best = max(mean["ESR-1"], key=mean["ESR-1"].__getitem__)
        ties = sorted(m for m, v in mean["ESR-1"].items() if v == mean["ESR-1"][best])
        checks.append(("a UCE-like method erases hardest (max ESR-1)", any(m in UCE_LIKE for m in ties),
                       f"hardest: {', '.join(ties)} (ESR-1 {mean['ESR-1'][best]:.1f})"))
    else:
        checks.append(("a UCE-like method erases hardest (max ESR-1)", None, "no ESR-1 measured"))

    def pair(claim: str, a: str, b: str, metric: str) -> None:
        table = psr if metric == "PSR-1" else esr
        if a not in table or b not in table:
            checks.append((claim, None, f"needs {a} and {b} (missing or failed)"))
        elif len(table[a]) > 1:
            diff = paired_difference(table[a], table[b])
            said = verdict(diff)
            checks.append((claim, None if said == "no difference" else said == "higher",
                           f"{metric} {a} - {b} over {len(table[a])} paired seeds: {diff.mean:+.1f} [{diff.lo:+.1f}, {diff.hi:+.1f}] ({said})"))
        else:
            checks.append((claim, table[a][0] > table[b][0], f"{metric}: {a} {table[a][0]:.1f} vs {b} {table[b][0]:.1f} (one seed)"))

    pair("ESD-x preserves neighbours better than UCE (PSR-1)", "esd-x", "uce", "PSR-1")
    if "eap" in esr and esr:
        top = max(mean["ESR-1"].values())
        checks.append((f"EAP's ESR-1 within {WITHIN:g} points of the best", top - mean["ESR-1"]["eap"] <= WITHIN,
                       f"EAP {mean['ESR-1']['eap']:.1f} vs best {top:.1f}"))
    else:
        checks.append((f"EAP's ESR-1 within {WITHIN:g} points of the best", None, "needs eap (missing or failed)"))
    pair("EAP keeps PSR-1 above ESD-x's", "eap", "esd-x", "PSR-1")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", default="circle", help="Toy object class to erase (default: circle).")
    parser.add_argument("--methods", default=None, help="Comma-separated methods (default: every registered one).")
    parser.add_argument("--model", default="toy", help="'toy' (default) or a world-train pipeline folder.")
    parser.add_argument("--out", type=Path, default=None, help="Folder to create (default: runs/compare-<concept>-<time>).")
    parser.add_argument("--images-per-class", type=int, default=None, help="Evaluation images per class (default: the suite's 50).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the evaluation and the first training seed.")
    parser.add_argument("--seeds", type=int, default=3, help="Training seeds per method, paired across methods (default 3; 1 = no intervals).")
    parser.add_argument("--set", action="append", default=[], help="METHOD.KEY=VALUE on top of the toy preset (repeatable).")
    parser.add_argument("--judge", default=None, help="Judge folder (default: beside the pipeline, else the shipped one).")
    parser.add_argument("--in-process", action="store_true", help="Run the erasures in this process (peak memory then less honest).")
    args = parser.parse_args(argv)

    from erasekit.compare import compare_methods, markdown
    from erasekit.errors import ErasekitError

    out = args.out or Path("runs") / f"compare-{args.concept}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # no --methods: compare picks every method of the model's kind (the toy model is a diffusion model: not ear)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    print(f"erasing {args.concept!r} from {args.model} with {', '.join(methods) if methods else 'every diffusion method'} -> {out}", file=sys.stderr, flush=True)

    def progress(label: str, done: int, total: int | None, info: str) -> None:
        if total and done == total:
            print(f"  {label}: {done}/{total} {info}", file=sys.stderr, flush=True)

    try:
        from erasekit.compare import parse_settings

        summary = compare_methods(args.model, args.concept, out, methods=methods, suites=["toy-objects"], images_per_class=args.images_per_class,
                                  seed=args.seed, judge=args.judge, isolate=not args.in_process, progress=progress,
                                  command="python " + " ".join(sys.argv), seeds=args.seeds, overrides=parse_settings(args.set, methods))
    except ErasekitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(summary))
    print("Shape of the paper's Table 1 (Imagenette) on the toy world:")
    for claim, holds, numbers in paper_shape(summary):
        verdict = "n/a" if holds is None else "yes" if holds else "NO"  # n/a: cannot be judged, or no resolved difference
        print(f"  [{verdict:>3}] {claim}: {numbers}")
    print(f"\nfull report: {out / 'report.html'}; table: {out / 'compare.md'}; numbers: {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
