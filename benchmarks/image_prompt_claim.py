"""Co-Erasing's claim on the toy world: a text-only erasure can still be reached through an image prompt.

    python benchmarks/image_prompt_claim.py --concept circle --methods esd-x,eap,co-erasing --seeds 3 --json out.json
    python benchmarks/image_prompt_claim.py --from COMPARE_DIR ...   # the erased models of `erasekit compare --seeds 3`

Each method erases the concept with its toy preset on training seeds 0..S-1 (``--first-seed F``: F..F+S-1; ``--add-to
JSON`` joins an earlier run's seeds to these before the intervals); the erased model (and the base) then
generates through the toy IP-Adapter, prompted with renders of the concept (every colour, two styles) and
  - image alone (empty text): the concept rate the judge reads (top-1 object) — the claim's measurement;
  - image + the concept's text prompt;
  - renders of every *other* object, image alone: the rate at which they come out as themselves (the image-side PSR).
Prints each rate with 95 % intervals over the seeds (widened to Wilson's over the images) and the paired difference of
every method from co-erasing on the claim's measurement, with whether it resolves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn


def renders(obj: str, styles: int, seed: int) -> list[Any]:
    """PIL renders of ``obj`` in every colour and the first ``styles`` styles (no implicit mark)."""
    from PIL import Image

    from erasekit.world.render import Scene, render
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    return [Image.fromarray(render(Scene(obj, c, s, False, seed), vocab)) for c in vocab.colours for s in vocab.styles[:styles]]


def rates(pipe: Any, judge: Any, concept: str, text: str, images_per: int, styles: int) -> dict[str, float]:
    """The three rates (%) for one model with the adapter attached."""
    from erasekit.sampling import generate
    from erasekit.world.judge import judge_images
    from erasekit.world.vocab import load_vocab

    objects = load_vocab().objects

    def object_rate(obj: str, prompt: str) -> tuple[int, int]:
        hits = total = 0
        for k, picture in enumerate(renders(obj, styles, 0)):
            seeds = [10_000 + 100 * k + j for j in range(images_per)]
            out = generate(pipe, [prompt] * images_per, seeds, steps=25, guidance=7.5, image_prompt=picture)
            hits += int((judge_images(judge, out)["object"].argmax(1) == objects.index(obj)).sum())
            total += images_per
        return hits, total

    alone, n = object_rate(concept, "")
    named, _ = object_rate(concept, text)
    others = [object_rate(o, "") for o in objects if o != concept]
    kept = sum(h for h, _ in others) / sum(t for _, t in others)
    return {"image alone": 100 * alone / n, "image + text": 100 * named / n, "other objects kept": 100 * kept, "images": n}


def _fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> int:
    """Run the claim's table and print it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", default="circle")
    parser.add_argument("--methods", default="esd-x,eap,co-erasing")
    parser.add_argument("--seeds", type=int, default=3, help="Training seeds to run (0 with --add-to: print that file's table, run nothing).")
    parser.add_argument("--first-seed", type=int, default=0, help="Training seeds FIRST..FIRST+SEEDS-1 (to add seeds to an earlier --json).")
    parser.add_argument("--images-per", type=int, default=2, help="Generations per render (seeds).")
    parser.add_argument("--styles", type=int, default=2, help="Styles of the renders (x every colour).")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--add-to", type=Path, default=None, help="An earlier --json of other seeds: its per-seed rows join these.")
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="A `erasekit compare` folder of the same concept: its METHOD-seedS runs are loaded, not trained again.")
    args = parser.parse_args()
    import torch

    from erasekit.api import erase
    from erasekit.eval.intervals import paired_difference, rate_interval, verdict
    from erasekit.image_prompt import attach_adapter, toy_adapter_dir
    from erasekit.models import load_pipeline, toy_dir
    from erasekit.result import load
    from erasekit.world.captions import object_prompt
    from erasekit.world.judge import Judge
    from erasekit.world.vocab import load_vocab

    methods = ["base", *[m for m in args.methods.split(",") if m]]
    earlier: dict[str, Any] = {}
    if args.add_to:
        try:
            earlier = json.loads(args.add_to.read_text())
        except (OSError, ValueError) as exc:
            _fail(f"--add-to {args.add_to}: cannot read it ({exc}); give a --json this benchmark wrote")
        if set(earlier) != set(methods):
            _fail(f"--add-to {args.add_to} holds {', '.join(sorted(earlier))}, not this run's {', '.join(sorted(methods))}; give the same --methods")
    if args.seeds < 0 or (args.seeds == 0 and not earlier):
        _fail(f"--seeds {args.seeds}: give at least 1 (or 0 with --add-to, to print an earlier run's table)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    judge = Judge.load(toy_dir() / "judge")
    text = object_prompt(args.concept)
    table: dict[str, list[dict[str, float]]] = {}
    for method in methods:  # --seeds 0: no seed to run, only the earlier file's rows
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            started = time.perf_counter()
            pipe = load_pipeline("toy")
            run = args.source / f"{method}-seed{seed}" if args.source else None
            if run is not None and method != "base":
                if not run.is_dir():
                    _fail(f"--from {args.source} has no run {run.name}; compare with --seeds {args.seeds} and these methods first")
                load(pipe, run)
            elif method != "base":
                erase(pipe, args.concept, method=method, budget="toy", seed=seed).apply(pipe)
            attach_adapter(pipe, toy_adapter_dir())
            row = rates(pipe, judge, args.concept, text, args.images_per, args.styles)
            row["seconds"] = round(time.perf_counter() - started, 1)
            table.setdefault(method, []).append(row)
            print(f"{method} seed {seed}: {json.dumps(row)}", file=sys.stderr, flush=True)
            if method == "base":
                table["base"] *= args.seeds  # the base has no training seed: one measurement stands for every seed
                break
    if earlier:
        for method in methods:
            table[method] = earlier[method]["per_seed"] + table.get(method, [])
    keys = ("image alone", "image + text", "other objects kept")
    n = int(table["base"][0]["images"])
    pooled = {"image alone": n, "image + text": n, "other objects kept": n * (len(load_vocab().objects) - 1)}  # renders per object alike
    print(f"concept {args.concept}, {len(table['base'])} training seeds, {n} generations per seed through the toy IP-Adapter (mean [95 %])")
    print("| method | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    summary: dict[str, Any] = {}
    for method, rows in table.items():
        cells = {k: rate_interval([r[k] for r in rows], images=pooled[k]) for k in keys}
        summary[method] = {"per_seed": rows, **{k: v.as_dict() for k, v in cells.items()}}
        print(f"| {method} | " + " | ".join(f"{v.mean:.1f} [{v.lo:.1f}, {v.hi:.1f}]" for v in cells.values()) + " |")
    if "co-erasing" in table:
        for method in [m for m in table if m not in ("co-erasing", "base")]:
            d = paired_difference([r["image alone"] for r in table[method]], [r["image alone"] for r in table["co-erasing"]])
            summary[method]["minus co-erasing (image alone)"] = d.as_dict()
            print(f"{method} - co-erasing, concept rate from the image alone: {d.mean:+.1f} [{d.lo:+.1f}, {d.hi:+.1f}] -> {verdict(d)}")
            k = paired_difference([r["other objects kept"] for r in table[method]], [r["other objects kept"] for r in table["co-erasing"]])
            summary[method]["minus co-erasing (other objects kept)"] = k.as_dict()
            print(f"{method} - co-erasing, other objects kept from their images: {k.mean:+.1f} [{k.lo:+.1f}, {k.hi:+.1f}] -> {verdict(k)}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
