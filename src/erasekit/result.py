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
KINDS = ("weights", "lora", "hook")
HOOK_PREFIX = "hook."  # a weights or LoRA delta that also carries a hook keeps the hook's tensors under this prefix


@dataclass(frozen=True)
class ErasureResult:
    """The outcome of an erasure: the changed tensors and everything needed to reproduce and apply them.

    ``kind`` is ``weights`` (new values of the changed parameters, keys ``<component>.<name>`` with the component
    ``unet``/``transformer`` or ``text_encoder``/``text_encoder_2``/``text_encoder_3``), ``lora`` (a LoRA state dict
    in the format diffusers' ``pipe.load_lora_weights`` reads, text-encoder keys included), or ``hook`` (the tensors
    of an inference-time hook on one text-encoder layer, described by ``hook``; see :mod:`erasekit.hooks`). A weights
    or LoRA delta may carry a hook too (Geom-Erasing: fine-tuned weights and a negative prompt), its tensors under
    ``hook.``: ``apply`` changes the weights and installs the hook, ``remove`` takes the hook off.
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
    hook: dict[str, Any] = field(default_factory=dict)  # {type, encoder, layer, settings} (erasekit.hooks): kind "hook", or one a weights delta carries

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors that change weights (none for a hook; a weights or LoRA delta without the tensors of a hook it carries)."""
        if self.kind == "hook":
            return {}
        return {k: v for k, v in self.delta.items() if not k.startswith(HOOK_PREFIX)}

    @property
    def hook_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the hook this delta installs (empty when it carries none)."""
        if self.kind == "hook":
            return self.delta
        return {k.removeprefix(HOOK_PREFIX): v for k, v in self.delta.items() if k.startswith(HOOK_PREFIX)}

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
            **({"hook": json.dumps(self.hook, sort_keys=True)} if self.kind == "hook" or self.hook else {}),
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
        """Refuse ``pipe`` when it is of another family, (``check_base``) its weights are not this delta's base, or a key does not fit it."""
        from erasekit.autoregressive.janus import Janus
        from erasekit.delta_keys import check_lora, weight_targets
        from erasekit.families import family_of
        from erasekit.hooks import prepare

        check_kind(self.kind, "this delta")
        if isinstance(pipe, Janus):  # the autoregressive family: its own keys and base hash
            from erasekit.autoregressive.delta import check_delta

            check_delta(pipe, self, check_base)
            return
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
        if self.kind == "weights":
            weight_targets(pipe, self.weights)
        elif self.kind == "lora":
            check_lora(pipe, self.weights)
        if self.hook:
            prepare(pipe, self.hook_tensors, self.hook)

    def apply(self, pipe: Any, check_base: bool = True) -> Any:
        """Apply this delta to ``pipe`` in place (every key checked first: a refused delta changes nothing) and return it.

        ``pipe`` is a diffusers pipeline, or a loaded :class:`erasekit.autoregressive.Janus` for a delta made on Janus.

        A ``hook`` installs a forward hook and leaves the weights as they are; a pipeline already carrying an
        erasekit hook is refused (take it off first with :meth:`remove` or ``erasekit.remove(pipe)``). A weights
        delta that carries a hook changes the weights, then installs the hook (both checked first).
        """
        from erasekit.autoregressive.janus import Janus
        from erasekit.delta_keys import weight_targets
        from erasekit.hooks import check_installable, install

        if isinstance(pipe, Janus):  # a loaded Janus (erasekit.autoregressive): a weights delta of its own parameters
            from erasekit.autoregressive.delta import apply_delta

            return apply_delta(pipe, self, check_base)
        self.check_fits(pipe, check_base)
        if self.hook:
            check_installable(pipe, self.hook_tensors, self.hook)
        if self.kind == "hook":
            install(pipe, self.delta, self.hook)
            return pipe
        if self.kind == "lora":
            from erasekit.models import quiet_loading

            with quiet_loading():  # diffusers warns of each component the LoRA leaves alone; transformers draws a loading bar
                pipe.load_lora_weights({k: v.clone() for k, v in self.delta.items()}, adapter_name="erasekit")
                pipe.fuse_lora(adapter_names=["erasekit"])
                pipe.unload_lora_weights()
        else:
            with torch.no_grad():
                for key, target in weight_targets(pipe, self.weights).items():
                    target.copy_(self.delta[key].to(device=target.device, dtype=target.dtype))
        if self.hook:
            install(pipe, self.hook_tensors, self.hook)
        return pipe

    def remove(self, pipe: Any) -> Any:
        """Take this result's hook off ``pipe`` and return it; weights and LoRA deltas changed weights in place and are refused
        (one that carries a hook has the hook taken off; its weights stay)."""
        from erasekit.hooks import fingerprint, take_off

        if not self.hook:
            raise ErasekitError(f"a {self.kind} delta changed the pipeline's weights in place and cannot be taken off; load the base model again")
        if not take_off(pipe, only=fingerprint(self.hook_tensors, self.hook)):
            raise ErasekitError("this result's hook is not on the pipeline; nothing to take off (erasekit.remove(pipe) takes off any erasekit hook)")
        return pipe


def check_kind(kind: str, what: str) -> None:
    """Refuse a delta kind this erasekit cannot apply."""
    if kind not in KINDS:
        raise ErasekitError(f"{what} is of kind {kind!r}, which this erasekit cannot apply (it applies {', '.join(KINDS)}); a newer erasekit may")


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
        result = ErasureResult(
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
            hook=json.loads(meta.get("hook", "{}")),
        )
    except (KeyError, ValueError) as exc:
        raise ErasekitError(f"{path} has a damaged erasekit header ({exc})") from exc
    check_kind(result.kind, str(path))
    if result.kind == "hook" or result.hook:
        from erasekit.hooks import check_spec

        try:
            check_spec(result.hook)
        except ErasekitError as exc:
            raise ErasekitError(f"{path}: {exc}") from None
    return result


def load(pipe: Pipeline, path: str | Path, check_base: bool = True) -> Pipeline:
    """Apply the delta saved at ``path`` (a delta file or a run folder) to ``pipe`` (in place) and return the pipeline."""
    return load_result(path).apply(pipe, check_base=check_base)
