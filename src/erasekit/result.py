"""ErasureResult: what a method returns, saved as one safetensors file of only what changed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from erasekit import __version__
from erasekit.errors import ErasekitError
from erasekit.families.base import Pipeline
from erasekit.models import atomic_write_bytes, weights_hash

FORMAT = "erasekit-delta"
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ErasureResult:
    """The outcome of an erasure: the changed tensors and everything needed to reproduce and apply them.

    ``kind`` is ``weights`` (new values of the changed UNet parameters, keys ``unet.<name>``) or
    ``lora`` (a diffusers-format LoRA state dict).
    """

    method: str
    concepts: tuple[str, ...]
    delta: dict[str, torch.Tensor]
    kind: str = "weights"
    config: dict[str, Any] = field(default_factory=dict)
    preserve: tuple[str, ...] = ()
    base_model_id: str = ""
    base_hash: str = ""
    history: tuple[dict[str, Any], ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    family: str = "sd"  # the model family the delta was made on (erasekit.families)

    def metadata(self) -> dict[str, str]:
        """String metadata stored in the safetensors header."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "method": self.method,
            "concepts": json.dumps(list(self.concepts)),
            "preserve": json.dumps(list(self.preserve)),
            "config": json.dumps(self.config, sort_keys=True, default=str),
            "base_model_id": self.base_model_id,
            "base_hash": self.base_hash,
            "erasekit_version": __version__,
            "timings": json.dumps(self.timings),
            "family": self.family,
        }

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the delta as one ``.safetensors`` file (atomically) and return its path; refuse to clobber unless asked.

        ``path`` is the file (``*.safetensors``) or a folder: an existing one, or a name without a suffix, which is
        created (its parent must exist); the delta is then ``folder/delta.safetensors``, as `erasekit erase` writes it.
        """
        from erasekit.result_io import save_target

        path, made = save_target(Path(path), overwrite)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.delta.items()}
        try:
            atomic_write_bytes(path, st_save(tensors, metadata=self.metadata()))
        except BaseException:
            if made is not None:  # the folder this call created: leave nothing behind
                import shutil

                shutil.rmtree(made, ignore_errors=True)
            raise
        return path

    def check_fits(self, pipe: Any, check_base: bool = True) -> None:
        """Refuse ``pipe`` when it is of another family, or (``check_base``) its weights are not this delta's base."""
        from erasekit.families import family_of

        family = family_of(pipe)
        if family.name != self.family:
            raise ErasekitError(
                f"this delta was made on a {self.family} model and cannot load into this {family.name} ({family.label}) pipeline; "
                f"apply it to a {self.family} model of the same base"
            )
        if check_base and self.base_hash:
            found = weights_hash(pipe)
            if found != self.base_hash:
                raise ErasekitError(
                    f"this delta was made for base {self.base_model_id!r} (hash {self.base_hash}) but the pipeline's weights hash to {found}; "
                    "load the same base model, or pass check_base=False / --force to apply anyway"
                )

    def apply(self, pipe: Any, check_base: bool = True) -> Any:
        """Apply this delta to ``pipe`` in place (refusing a different base or family) and return it."""
        from erasekit.families import family_of

        family = family_of(pipe)
        self.check_fits(pipe, check_base)
        if self.kind == "lora":
            pipe.load_lora_weights({k: v.clone() for k, v in self.delta.items()}, adapter_name="erasekit")
            pipe.fuse_lora(adapter_names=["erasekit"])
            pipe.unload_lora_weights()
            return pipe
        prefix = "unet." if hasattr(pipe, "unet") else "transformer."
        params = dict(family.denoiser(pipe).named_parameters())
        for key, value in self.delta.items():
            name = key.removeprefix(prefix)
            if not key.startswith(prefix) or name not in params:
                raise ErasekitError(f"the delta changes {key!r}, which this pipeline's {prefix[:-1]} does not have; it was made for another architecture")
            if params[name].shape != value.shape:
                raise ErasekitError(f"shape mismatch for {key}: delta {tuple(value.shape)} vs model {tuple(params[name].shape)}")
        with torch.no_grad():
            for key, value in self.delta.items():
                target = params[key.removeprefix(prefix)]
                target.copy_(value.to(device=target.device, dtype=target.dtype))
        return pipe


def load_result(path: str | Path) -> ErasureResult:
    """Read a delta written by :meth:`ErasureResult.save` (the file, or the run folder that holds delta.safetensors), validating its header."""
    from erasekit.result_io import delta_file

    path = delta_file(Path(path))
    if not path.is_file():
        raise ErasekitError(f"no delta file at {path}; pass the .safetensors file that `erasekit erase` wrote")
    try:
        raw = path.read_bytes()
        tensors = st_load(raw)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ErasekitError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or tampered with") from exc
    if meta.get("format") != FORMAT:
        raise ErasekitError(f"{path} is not an erasekit delta (no '{FORMAT}' header)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ErasekitError(f"{path} has delta format version {meta.get('format_version')!r}; this erasekit reads version {FORMAT_VERSION}")
    try:
        return ErasureResult(
            method=meta["method"],
            concepts=tuple(json.loads(meta["concepts"])),
            delta=tensors,
            kind=meta["kind"],
            config=json.loads(meta["config"]),
            preserve=tuple(json.loads(meta.get("preserve", "[]"))),
            base_model_id=meta.get("base_model_id", ""),
            base_hash=meta.get("base_hash", ""),
            timings=json.loads(meta.get("timings", "{}")),
            family=meta.get("family", "sd"),  # deltas from before the family layer are all SD 1.x/2.x
        )
    except (KeyError, ValueError) as exc:
        raise ErasekitError(f"{path} has a damaged erasekit header ({exc})") from exc


def load(pipe: Pipeline, path: str | Path, check_base: bool = True) -> Pipeline:
    """Apply the delta saved at ``path`` (a delta file or a run folder) to ``pipe`` (in place) and return the pipeline."""
    return load_result(path).apply(pipe, check_base=check_base)
