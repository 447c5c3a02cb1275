"""Wall time of the same toy-objects evaluation on one process and on two (`accelerate launch`, CPU, gloo).

    python benchmarks/accelerate_eval.py [--images-per-class 10] [--steps 25] [--batch-size 8] [--processes 2]

Each run starts from an empty generation cache and is launched the same way (`accelerate launch -m erasekit evaluate`),
so both pay the same start-up; the metrics of the runs must agree exactly. On 2 cores expect little gain: the point is
correctness and the path to a cluster. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def launch(processes: int, folder: Path, args: argparse.Namespace) -> tuple[float, dict]:
    """Run the evaluation on ``processes`` processes; (wall seconds, the evaluation JSON)."""
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    folder.mkdir(parents=True)
    mode = ["--multi_gpu"] if processes > 1 else []
    cmd = [launcher, "launch", *mode, "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", "-m", "erasekit", "evaluate", "toy", "--suite", "toy-objects",
           "--erased", "circle", "--images-per-class", str(args.images_per_class), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--cache-dir", str(folder / "cache"), "--json", str(folder / "eval.json"), "--device", "cpu"]
    threads = max(1, (os.cpu_count() or 1) // processes)  # the same cores in total, split among the processes
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"error: the {processes}-process evaluation failed:\n{done.stderr[-3000:]}")
    return wall, json.loads((folder / "eval.json").read_text())


def main() -> None:
    """Time one and N processes on the same evaluation and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="erasekit-accel-") as tmp:
        one_s, one = launch(1, Path(tmp) / "one", args)
        many_s, many = launch(args.processes, Path(tmp) / "many", args)
    load = round(max(load_before, os.getloadavg()[0]), 2)  # other work on the machine skews both timings; say how much there was
    if many["metrics"] != one["metrics"]:
        sys.exit("error: the metrics of one and several processes differ")
    images = 10 * args.images_per_class
    print(f"toy-objects, {images} images at {args.steps} DDIM steps, batch {args.batch_size}, {os.cpu_count()} cores")
    print(f"1 process:  {one_s:.1f} s")
    print(f"{args.processes} processes: {many_s:.1f} s (metrics identical); load average up to {load}")
    print(json.dumps({"images": images, "steps": args.steps, "cores": os.cpu_count(), "one_process_s": round(one_s, 2),
                      f"{args.processes}_processes_s": round(many_s, 2), "speedup": round(one_s / many_s, 3), "metrics_identical": True,
                      "load_average": load}))


if __name__ == "__main__":
    main()
