"""The look-alike-pair bar of `erasekit world check`, over ESD-x training seeds and erasure strengths.

    python benchmarks/lookalike_bar.py --seeds 3 --iterations 150 --json out.json
    python benchmarks/lookalike_bar.py --seeds 3 --iterations 150,600 --device cuda --workers 8 --json out.json
    python benchmarks/lookalike_bar.py --summarise bar12.json --summarise check.json    # spectra over saved seeds

For each designed pair (a, b) and each (iterations, training seed): erase a from the shipped toy world with
ESD-x (toy preset, ``iterations`` model steps), generate every object's evaluation prompt with the base and the
erased model (16 seeds each), and rank the other objects by the drop in the judge's mean probability of their
class — the world check's code (`erasekit.world.pairs`), which runs the preset at training seed 0 only. Prints,
per setting, each pair's partner rank and drop, the erased object's own drop, and how many pairs meet the bar
(partner among the three most affected, drop >= 5 points), per seed. ``--deadline-s`` stops handing out work
after that many seconds; what finished is printed and saved. ``--summarise FILE`` (repeatable) runs nothing: it
pools saved rows (this script's ``--json``, or `erasekit world check --json`, whose pairs are training seed 0 at the
preset's 150 iterations) into each pair's spectrum over the seeds, every drop a mean with its 95 % t interval.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NoReturn

_STATE: dict[str, Any] = {}


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load(device: str, images_per_class: int) -> None:
    """Load the shipped toy world on ``device`` once per process, and its base class scores."""
    if _STATE:
        return
    import torch

    from erasekit.world.check import default_toy_dir, generate, load_toy_judge, load_toy_pipeline
    from erasekit.world.pairs import class_scores

    torch.set_num_threads(2 if device != "cpu" else torch.get_num_threads())
    pipe = load_toy_pipeline(default_toy_dir() / "pipeline").to(device)
    judge = load_toy_judge(default_toy_dir() / "judge")

    def gen(p: Any, prompts: list[str], seeds: list[int]) -> Any:
        return generate(p, prompts, seeds, 25, 7.5)

    _STATE.update(pipe=pipe, judge=judge, gen=gen, base=class_scores(pipe, judge, gen, images_per_class))


def one_pair(device: str, images_per_class: int, iterations: int, seed: int, erased: str, partner: str) -> dict:
    """Erase ``erased`` with ESD-x at ``iterations`` steps and training seed ``seed``; the partner's row."""
    try:
        return _one_pair(device, images_per_class, iterations, seed, erased, partner)
    except Exception as exc:  # reported with its job, so one failure does not hide the others' results
        import traceback

        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-1500:],
                "iterations": iterations, "seed": seed, "erased": erased, "partner": partner}


def _one_pair(device: str, images_per_class: int, iterations: int, seed: int, erased: str, partner: str) -> dict:
    from erasekit.world.pairs import erase_and_rank

    _load(device, images_per_class)
    start = time.perf_counter()
    row = erase_and_rank(_STATE["pipe"], _STATE["judge"], _STATE["gen"], _STATE["base"], erased, partner, images_per_class,
                         iterations=iterations, seed=seed)
    return {**row, "iterations": iterations, "seed": seed, "seconds": round(time.perf_counter() - start, 1)}


def summarise(rows: list[dict]) -> list[str]:
    """Lines of the printed table: per setting and seed, every pair's partner rank / drop and own drop, and the met count."""
    lines = []
    for iterations in sorted({r["iterations"] for r in rows}):
        at = [r for r in rows if r["iterations"] == iterations]
        lines.append(f"ESD-x, {iterations} iterations (toy preset otherwise):")
        lines.append("  seed | " + " | ".join(f"{r['erased']}->{r['partner']}" for r in at if r["seed"] == at[0]["seed"]) + " | met")
        for seed in sorted({r["seed"] for r in at}):
            mine = [r for r in at if r["seed"] == seed]
            cells = [f"rank {r['partner_rank']} / {r['partner_drop']:+.1f} (own {r['own_drop']:.1f}; top {','.join(r['top'])})" for r in mine]
            lines.append(f"  {seed} | " + " | ".join(cells) + f" | {sum(r['met'] for r in mine)}/{len(mine)}")
    return lines


def load_rows(paths: list[Path]) -> list[dict]:
    """Saved rows of this script's --json files and of world-check JSON (training seed 0, the preset's 150 iterations)."""
    rows: list[dict] = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            _fail(f"cannot read {path} as JSON ({exc}); pass a file written by --json or by `erasekit world check --json`")
        if isinstance(data, dict) and "lookalike_pairs" in data:
            data = [{**r, "seed": 0, "iterations": 150} for r in data["lookalike_pairs"]["pairs"]]
        if not isinstance(data, list) or not all(isinstance(r, dict) and "drops" in r and "seed" in r for r in data):
            _fail(f"{path} holds no look-alike rows; pass a file written by --json or by `erasekit world check --json`")
        rows += [r for r in data if "error" not in r]
    seen: set[tuple] = set()
    for r in rows:
        key = (r["iterations"], r["seed"], r["erased"])
        if key in seen:
            _fail(f"{r['erased']} at seed {r['seed']}, {r['iterations']} iterations appears twice; pass each run once")
        seen.add(key)
    return rows


def spectra(rows: list[dict]) -> list[str]:
    """Per setting and pair, over its seeds: every class's mean drop [95 % t interval], most hurt first, and the partner's rank."""
    from erasekit.eval.intervals import paired_difference

    def cell(values: list[float]) -> str:
        if len(values) < 2:
            return f"{values[0]:.1f}"
        d = paired_difference(values, [0.0] * len(values))
        return f"{d.mean:.1f} [{max(d.lo, -100.0):.1f}, {min(d.hi, 100.0):.1f}]"  # a drop of a probability lies in [-100, 100] points

    lines = []
    for iterations in sorted({r["iterations"] for r in rows}):
        at = [r for r in rows if r["iterations"] == iterations]
        for erased in dict.fromkeys(r["erased"] for r in at):
            mine = sorted((r for r in at if r["erased"] == erased), key=lambda r: r["seed"])
            partner = mine[0]["partner"]
            classes = [c for c in mine[0]["drops"]] + [erased]
            drops = {c: [r["own_drop"] if c == erased else r["drops"][c] for r in mine] for c in classes}
            mean = {c: sum(v) / len(v) for c, v in drops.items()}
            others = sorted((c for c in classes if c != erased), key=lambda c: (-mean[c], c))
            ranks = ", ".join(str(r["partner_rank"]) for r in mine)
            lines.append(f"{erased} -> {partner}, ESD-x {iterations} iterations, seeds {', '.join(str(r['seed']) for r in mine)}: "
                         f"partner rank by mean drop {others.index(partner) + 1} (per seed {ranks})")
            lines.append(f"  own {cell(drops[erased])}; " + "; ".join(f"{c} {cell(drops[c])}" for c in others))
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every (iterations, seed, pair) erasure, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="ESD-x training seeds first-seed..first-seed+S-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--iterations", default="150", help="comma-separated ESD-x model steps (toy preset: 150)")
    parser.add_argument("--images-per-class", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="processes (each loads the world; on a GPU they share it)")
    parser.add_argument("--deadline-s", type=float, default=0.0, help="hand out no work after this many seconds (0: none)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--summarise", type=Path, action="append", default=[],
                        help="print the spectra pooled over saved runs (this script's --json or world check's), run nothing")
    args = parser.parse_args(argv)
    if args.summarise:
        print("\n".join(spectra(load_rows(args.summarise))))
        return
    try:
        its = [int(x) for x in args.iterations.split(",") if x.strip()]
    except ValueError:
        _fail(f"--iterations takes comma-separated whole numbers, got {args.iterations!r}")
    if not its or min(its) < 1 or args.seeds < 1 or args.first_seed < 0 or args.images_per_class < 1 or args.workers < 1:
        _fail("--iterations, --seeds, --images-per-class and --workers must be at least 1, --first-seed at least 0")
    from erasekit.world.vocab import load_vocab

    jobs = [(args.device, args.images_per_class, n, s, a, b) for n in its
            for s in range(args.first_seed, args.first_seed + args.seeds) for a, b in load_vocab().lookalike_pairs()]
    start, rows = time.perf_counter(), []
    if args.workers == 1:
        for job in jobs:
            if args.deadline_s and time.perf_counter() - start > args.deadline_s:
                break
            rows.append(one_pair(*job))
            if "error" in rows[-1]:
                _fail(f"{rows[-1]['error']}\n{rows[-1]['trace']}")
            print(f"  {job[2]} it seed {job[3]} {job[4]}: rank {rows[-1]['partner_rank']} drop {rows[-1]['partner_drop']}", flush=True)
    else:
        import multiprocessing

        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(one_pair, *job) for job in jobs]
            for future in as_completed(futures):
                if args.deadline_s and time.perf_counter() - start > args.deadline_s:
                    for f in futures:
                        f.cancel()
                try:
                    rows.append(future.result())
                except CancelledError:  # handed out after the deadline
                    continue
                r = rows[-1]
                if "error" in r:
                    print(f"  {r['iterations']} it seed {r['seed']} {r['erased']}: {r['error']}\n{r['trace']}", flush=True)
                    continue
                print(f"  {r['iterations']} it seed {r['seed']} {r['erased']}: rank {r['partner_rank']} drop {r['partner_drop']} own {r['own_drop']} ({r['seconds']} s)", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    order = {job[2:]: i for i, job in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["iterations"], r["seed"], r["erased"], r["partner"])])
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    print("\n".join(summarise(rows)))
    if failed:
        print(f"{len(failed)} job(s) failed: {failed[0]['error']}")
    print(f"wall {time.perf_counter() - start:.0f} s on {args.device}")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
