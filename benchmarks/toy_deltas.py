"""Save or check the deltas of 13 short toy-world runs: a refactor that must not change results is checked with it.

    python benchmarks/toy_deltas.py save runs/deltas-before      # on the code before the change
    python benchmarks/toy_deltas.py check runs/deltas-before     # on the code after: prints max |diff| per run
    python benchmarks/toy_deltas.py check runs/deltas-before eap,age

Runs on one thread (the same kernels every time); each run is a few steps of a method's toy preset on the shipped
toy model, erasing "circle": eap (fast, faithful, shared and reused rollouts, random choice, LoRA), eap-pgd, esd-x,
esd-u, age (fast and faithful), ca, uce, rece. Used in session 4: every delta was bit-identical (max |diff| 0.0)
before and after the model-family layer.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from erasekit.api import erase
from erasekit.models import load_pipeline

RUNS: dict[str, dict] = {
    "eap": dict(method="eap", iterations=4),
    "eap-faithful": dict(method="eap", iterations=3, faithful=True),
    "eap-share": dict(method="eap", iterations=4, rollout_share=2, batch_size=2),
    "eap-random": dict(method="eap", iterations=3, preserve_choice="random"),
    "eap-pgd": dict(method="eap-pgd", iterations=4),
    "esd-x": dict(method="esd-x", iterations=4),
    "esd-u": dict(method="esd-u", iterations=3),
    "eap-lora": dict(method="eap", iterations=3, train_method="lora"),
    "age": dict(method="age", iterations=3),
    "age-faithful": dict(method="age", iterations=2, faithful=True),
    "ca": dict(method="ca", iterations=3),
    "uce": dict(method="uce"),
    "rece": dict(method="rece"),
}


def main() -> None:
    """Save or check every run's delta."""
    if len(sys.argv) < 3 or sys.argv[1] not in ("save", "check"):
        sys.exit("usage: python benchmarks/toy_deltas.py save|check FOLDER [run,run,...]")
    torch.set_num_threads(1)
    mode, folder = sys.argv[1], Path(sys.argv[2])
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(RUNS)
    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("toy")
    for name in names:
        settings = dict(RUNS[name])
        result = erase(pipe, "circle", method=settings.pop("method"), budget="toy", **settings)
        path = folder / f"{name}.safetensors"
        if mode == "save":
            save_file({k: v.contiguous() for k, v in result.delta.items()}, str(path))
            print(f"{name:13s} saved {len(result.delta)} tensors")
            continue
        reference = load_file(str(path))
        if set(reference) != set(result.delta):
            print(f"{name:13s} DIFFERENT KEYS: {sorted(set(reference) ^ set(result.delta))[:3]}")
            continue
        diff = max(float((reference[k] - result.delta[k]).abs().max()) for k in reference)
        print(f"{name:13s} max |diff| {diff:.3g}{'  identical' if diff == 0 else ''}")


if __name__ == "__main__":
    main()
