"""Weights deltas of a Janus model: the base hash, and applying an :class:`~erasekit.result.ErasureResult` to a loaded Janus.

A Janus delta is a plain ``weights`` ErasureResult with ``family="janus"`` and keys ``janus.<parameter name>`` (the
name ``JanusForConditionalGeneration.named_parameters`` gives). It is saved and read back by ``ErasureResult.save``
and ``load_result`` unchanged; ``ErasureResult.check_fits``/``apply`` (and so ``erasekit.load``) hand a loaded Janus
to :func:`check_delta`/:func:`apply_delta`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from erasekit.autoregressive.janus import Janus
from erasekit.errors import ErasekitError
from erasekit.result import ErasureResult, load_result

FAMILY = "janus"
PREFIX = "janus."


def janus_weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state-dict names, shapes, dtypes and bytes (first 16 hex digits), as erasekit hashes a base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{PREFIX}{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def delta_targets(janus: Janus, result: ErasureResult) -> dict[str, torch.nn.Parameter]:
    """The parameter each key of a Janus weights delta sets, every key checked (family, kind, name, shape) before anything changes."""
    if result.family != FAMILY:
        raise ErasekitError(f"this delta was made on a {result.family} model and cannot load into a Janus model; apply it to a model of its own family")
    if result.kind != "weights" or result.hook:
        raise ErasekitError(f"a Janus model takes weights deltas only; this one is of kind {result.kind!r}")
    table = dict(janus.model.named_parameters())
    targets = {}
    for key, value in result.delta.items():
        param = table.get(key.removeprefix(PREFIX)) if key.startswith(PREFIX) else None
        if param is None:
            raise ErasekitError(f"the delta changes {key!r}, which this Janus model does not have; it was made for another architecture")
        if param.shape != value.shape:
            raise ErasekitError(f"shape mismatch for {key}: delta {tuple(value.shape)} vs model {tuple(param.shape)}; it was made for another model size")
        targets[key] = param
    return targets


def check_delta(janus: Janus, result: ErasureResult, check_base: bool = True) -> dict[str, torch.nn.Parameter]:
    """:func:`delta_targets`, and (``check_base``) the model's weights hash checked against the delta's base."""
    targets = delta_targets(janus, result)
    if check_base and result.base_hash:
        found = janus_weights_hash(janus.model)
        if found != result.base_hash:
            raise ErasekitError(f"this delta was made for base {result.base_model_id!r} (hash {result.base_hash}) but the model's weights hash to {found}; "
                                "load the same base model, or pass check_base=False / --force to apply anyway")
    return targets


def apply_delta(janus: Janus, result: ErasureResult, check_base: bool = True) -> Janus:
    """Write a Janus weights delta into ``janus`` in place (every key checked first; the base hash unless told not to) and return it."""
    targets = check_delta(janus, result, check_base)
    with torch.no_grad():
        for key, param in targets.items():
            param.copy_(result.delta[key].to(device=param.device, dtype=param.dtype))
    return janus


def load_delta(janus: Janus, path: str | Path, check_base: bool = True) -> Janus:
    """Apply the Janus delta saved at ``path`` (a delta file or a run folder) to ``janus`` and return it."""
    return apply_delta(janus, load_result(path), check_base)
