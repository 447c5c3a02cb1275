"""Seconds per EAP model step on a tiny random model of every family (SD 1.x, SDXL, SD3, FLUX.1).

    python benchmarks/family_step.py                 # 20 steps per family after 2 warm-up steps, one thread
    python benchmarks/family_step.py --steps 50 --threads 2

Each family's tiny pipeline (erasekit.families.tiny) is saved to a temporary folder and loaded back as a
user's folder would be; EAP runs its `tiny` preset with more iterations. Prints one line per family and a
last line of JSON. The figures compare the families' code paths at toy size; they say nothing about the
released models' speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import erasekit
from erasekit.families.tiny import FAMILIES, build_tiny
from erasekit.models import load_pipeline


def seconds_per_step(folder: Path, steps: int, warmup: int) -> float:
    """Wall seconds of one EAP step: (time of warmup + steps) - (time of warmup), so setup cancels out."""
    timings = []
    for n in (warmup, warmup + steps):
        pipe = load_pipeline(str(folder))
        start = time.perf_counter()
        erasekit.erase(pipe, "circle", method="eap", budget="tiny", iterations=n)
        timings.append(time.perf_counter() - start)
    return (timings[1] - timings[0]) / steps


def main() -> None:
    """Time every family and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="Timed EAP steps per family (default 20).")
    parser.add_argument("--warmup", type=int, default=2, help="Steps of the run whose time is subtracted (default 2).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            folder = build_tiny(family, Path(tmp) / family)
            out[family] = round(seconds_per_step(folder, args.steps, args.warmup), 4)
            print(f"{family:5s} {out[family] * 1000:8.1f} ms per EAP step (tiny model, {args.threads} thread(s))", flush=True)
    print(json.dumps({"seconds_per_step": out, "steps": args.steps, "threads": args.threads}))


if __name__ == "__main__":
    main()
