"""Atomic checkpoints of a fine-tuning run (weights, optimiser, search, RNG, history) and exact resume.

A checkpoint is one safetensors file written through a temp file and a rename, so a kill at any
instant leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from erasekit.distributed import is_main_process
from erasekit.errors import ErasekitError
from erasekit.models import atomic_write_bytes

FILE = "checkpoint.safetensors"
FORMAT = "erasekit-checkpoint"


@dataclass(frozen=True)
class CheckpointSpec:
    """Where and how often a run checkpoints (``every`` model steps; 0 = only on Ctrl-C)."""

    folder: Path
    every: int = 50


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Flatten an optimiser's state into named tensors plus its JSON-able param groups."""
    state = opt.state_dict()
    tensors = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"{prefix}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, groups: list[dict[str, Any]]) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value.clone()
    opt.load_state_dict({"state": state, "param_groups": groups})


def save(spec: CheckpointSpec, step: int, setup: Any, search: Any | None) -> None:
    """Write the run's state after ``step`` completed model steps; under `accelerate launch` only the main process writes."""
    if not is_main_process():  # every process holds the same state; one file, one writer
        return
    tensors = {f"param.{n}": p.detach().clone().contiguous() for n, p in setup.trainable.params.items()}
    opt_t, opt_groups = optimizer_tensors(setup.optimizer, "opt")
    tensors.update(opt_t)
    tensors["rng"] = setup.generator.get_state()
    meta: dict[str, Any] = {"step": step, "opt_groups": opt_groups, "history": setup.history, "config": asdict(setup.config)}
    if search is not None:
        search_t, search_meta = search.state()
        tensors.update({f"search.{k}": v.detach().clone().contiguous() for k, v in search_t.items()})
        meta["search"] = search_meta
    header = {"format": FORMAT, "state": json.dumps(meta, default=str)}
    spec.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(spec.folder / FILE, st_save(tensors, metadata=header))


def load(spec: CheckpointSpec, setup: Any, search: Any | None) -> int:
    """Restore the run's state from ``spec.folder`` if a checkpoint is there; return the completed steps."""
    path = spec.folder / FILE
    if not path.exists():
        return 0
    try:
        raw = path.read_bytes()
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"]["state"])
        if header["__metadata__"].get("format") != FORMAT:
            raise ValueError("not an erasekit checkpoint")
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ErasekitError(f"checkpoint {path} is unreadable ({exc}); delete it to start the run over") from exc
    if meta["config"] != json.loads(json.dumps(asdict(setup.config), default=str)):
        raise ErasekitError(f"checkpoint {path} was written with other settings; resume with the same settings or delete it")
    with torch.no_grad():
        for name, p in setup.trainable.params.items():
            if f"param.{name}" not in tensors:
                raise ErasekitError(f"checkpoint {path} lacks parameter {name}; it belongs to another run")
            p.copy_(tensors[f"param.{name}"])
    load_optimizer_tensors(setup.optimizer, tensors, "opt", meta["opt_groups"])
    setup.generator.set_state(tensors["rng"])
    setup.history[:] = meta["history"]
    if search is not None:
        search.load_state({k[len("search.") :]: v for k, v in tensors.items() if k.startswith("search.")}, meta.get("search", {}))
    return int(meta["step"])
