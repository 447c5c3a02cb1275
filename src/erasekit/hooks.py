"""Inference-time erasure: a forward hook on one text-encoder layer that rewrites its hidden states, weights untouched.

A ``hook`` result (kind ``"hook"``, the registry's ``inference-time`` methods) saves the tensors its hook needs and, in
the header, the JSON spec ``{"type", "encoder", "layer", "settings"}``. A *hook type* turns (tensors, settings, the
layer's width) into a transform of the layer's hidden states (batch x tokens x width, same shape out); it is
registered by name in :data:`HOOK_TYPES`, by object or by ``"module:function"`` path so that a saved file loads in
a fresh process without importing the method that made it (ItD's sparse-autoencoder hook registers the same way).

A *denoiser* hook type (``on="denoiser"``, encoder ``"unet"``) acts on the UNet instead: its builder takes
(tensors, settings, the UNet) and returns an installer that puts its forward hooks on and returns their handles
(SPM's prompt-gated adapter). An *input* hook type (``on="text-encoder-input"``) acts on a text encoder's token ids
before its first layer: its builder takes (tensors, settings, the encoder) and returns an installer (the negative
prompt of Geom-Erasing replaces the empty prompt of the unconditional branch). One erasekit hook per pipeline: applying a second one is refused (take the first
off with :func:`remove`), except for hook types registered with ``stacks=True``: several of those (SPM adapters for
different concepts) act on one UNet together, each gated by its own prompt similarity, their outputs summed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from erasekit.delta_keys import TEXT_ENCODERS, check_encoder_usable
from erasekit.errors import ErasekitError

Transform = Callable[[torch.Tensor], torch.Tensor]  # a layer's hidden states -> the same shape
Build = Callable[[dict[str, torch.Tensor], dict[str, Any], int], Transform]  # (tensors, settings, width) -> transform
Installer = Callable[[], list[Any]]  # a denoiser hook: puts its torch hooks on, returns their handles
DENOISERS = ("unet",)  # where a denoiser hook type installs
ONS = ("text-encoder", "denoiser", "text-encoder-input")  # where a hook type acts: a text-encoder layer, the UNet, an encoder's token ids
ATTR = "_erasekit_hook"  # the text encoder's attribute that holds its installed hook (so a module shared by two pipelines shows it in both)


@dataclass(frozen=True)
class HookType:
    """A registered hook type: its name, what it does, and its builder (an object or a ``"module:function"`` path)."""

    name: str
    summary: str
    build_ref: Build | str | Callable[..., Installer]
    on: str = "text-encoder"  # "denoiser" / "text-encoder-input": the builder takes (tensors, settings, module) and returns an installer
    stacks: bool = False  # several hooks of this type may sit on one denoiser together

    @property
    def build(self) -> Any:
        """The builder (its module imported on first use)."""
        from erasekit.methods.specs import _resolve

        return _resolve(self.build_ref)


HOOK_TYPES: dict[str, HookType] = {}


def register_hook_type(name: str, build: Any, summary: str = "", on: str = "text-encoder", stacks: bool = False) -> HookType:
    """Register a hook type by name: ``build(tensors, settings, width)`` returns the transform (``on="denoiser"``:
    ``build(tensors, settings, unet)`` returns an installer), raising ErasekitError on bad input; ``stacks``: a
    denoiser hook type several of which may be applied to one pipeline."""
    if name in HOOK_TYPES:
        raise ValueError(f"hook type {name!r} registered twice")
    if on not in ONS:
        raise ValueError(f"hook type {name!r}: on must be one of {', '.join(ONS)}, got {on!r}")
    if stacks and on != "denoiser":
        raise ValueError(f"hook type {name!r}: only a denoiser hook type can stack")
    HOOK_TYPES[name] = HookType(name, summary, build, on, stacks)
    return HOOK_TYPES[name]


@dataclass(frozen=True)
class InstalledHook:
    """A hook on a pipeline: its spec, the fingerprint of its spec and tensors, and the torch handle that takes it off."""

    spec: dict[str, Any]
    fingerprint: str
    handle: Any

    def describe(self) -> str:
        """One line: which hook, where."""
        if self.spec["encoder"] in DENOISERS:
            return f"{self.spec['type']} on the {self.spec['encoder']}"
        if HOOK_TYPES.get(self.spec["type"]) and HOOK_TYPES[self.spec["type"]].on == "text-encoder-input":
            return f"{self.spec['type']} on {self.spec['encoder']}'s input"
        return f"{self.spec['type']} on {self.spec['encoder']} layer {self.spec['layer']}"


class Handles:
    """The torch handles of a denoiser hook, removed together."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        """Take every hook off."""
        for handle in self.handles:
            handle.remove()


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a text encoder (CLIP flattened or not, T5), in order."""
    for path in ("encoder.layers", "text_model.encoder.layers", "encoder.block"):
        try:
            found = encoder.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return found
    raise ErasekitError(f"cannot find the layers of this {type(encoder).__name__}; inference-time hooks support CLIP and T5 text encoders")


def _width(encoder: nn.Module) -> int:
    config = getattr(encoder, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
    if not isinstance(width, int):
        raise ErasekitError(f"this {type(encoder).__name__} names no hidden size in its config; inference-time hooks support CLIP and T5 text encoders")
    return width


def _encoder(pipe: Any, name: str) -> nn.Module:
    module = getattr(pipe, name, None)
    if not isinstance(module, nn.Module):
        have = ", ".join(n for n in TEXT_ENCODERS if isinstance(getattr(pipe, n, None), nn.Module)) or "none"
        raise ErasekitError(f"the hook acts on {name}, which this pipeline does not have (its text encoders: {have}); it was made for another architecture")
    check_encoder_usable(name, module)
    return module


def check_spec(spec: Any) -> dict[str, Any]:
    """``spec`` ({type, encoder, layer, settings}) checked for form, one line per fault; returns it."""
    if not isinstance(spec, dict) or set(spec) != {"type", "encoder", "layer", "settings"}:
        raise ErasekitError(f"the hook spec must have exactly the keys type, encoder, layer, settings; got {spec!r}")
    if spec["type"] not in HOOK_TYPES:
        raise ErasekitError(f"unknown hook type {spec['type']!r}; known: {', '.join(sorted(HOOK_TYPES))} (a newer erasekit may know it)")
    allowed = DENOISERS if HOOK_TYPES[spec["type"]].on == "denoiser" else TEXT_ENCODERS
    if spec["encoder"] not in allowed:
        raise ErasekitError(f"the {spec['type']} hook acts on one of {', '.join(allowed)}, not {spec['encoder']!r}; the delta is damaged")
    if not isinstance(spec["layer"], int) or isinstance(spec["layer"], bool):
        raise ErasekitError(f"the hook's layer must be a whole number (a layer index), got {spec['layer']!r}")
    if not isinstance(spec["settings"], dict):
        raise ErasekitError(f"the hook's settings must be a JSON object, got {spec['settings']!r}")
    return spec


def prepare_denoiser(pipe: Any, tensors: dict[str, torch.Tensor], spec: Any) -> tuple[nn.Module, Installer]:
    """A denoiser (or input) hook's module and its installer, every check done and nothing changed."""
    spec = check_spec(spec)
    if HOOK_TYPES[spec["type"]].on == "text-encoder-input":
        module: Any = _encoder(pipe, spec["encoder"])
    else:
        module = getattr(pipe, spec["encoder"], None)
        if not isinstance(module, nn.Module):
            raise ErasekitError(f"the {spec['type']} hook acts on the {spec['encoder']}, which this pipeline does not have; it was made for a UNet model")
    cpu = {k: v.detach().to("cpu") for k, v in tensors.items()}
    return module, HOOK_TYPES[spec["type"]].build(cpu, dict(spec["settings"]), module)


def _installs(spec: dict[str, Any]) -> bool:
    """Whether the hook type builds an installer (a denoiser or input hook) rather than a layer transform."""
    return HOOK_TYPES[spec["type"]].on != "text-encoder"


def prepare(pipe: Any, tensors: dict[str, torch.Tensor], spec: Any) -> tuple[nn.Module, int, Transform | None]:
    """The hooked layer, its index (from 0) and the built transform, every check done and nothing changed (a denoiser hook: the UNet, 0, None)."""
    spec = check_spec(spec)
    if _installs(spec):
        module, _ = prepare_denoiser(pipe, tensors, spec)
        return module, 0, None
    layers = encoder_layers(_encoder(pipe, spec["encoder"]))
    index = spec["layer"]
    if not -len(layers) <= index < len(layers):
        raise ErasekitError(f"the hook is on layer {index} of {spec['encoder']}, which has {len(layers)} layers; it was made for another architecture")
    index %= len(layers)
    transform = HOOK_TYPES[spec["type"]].build({k: v.detach().to("cpu") for k, v in tensors.items()}, dict(spec["settings"]),
                                               _width(getattr(pipe, spec["encoder"])))
    return layers[index], index, transform


def fingerprint(tensors: dict[str, torch.Tensor], spec: dict[str, Any]) -> str:
    """SHA-256 of the spec and the tensors' names, shapes, dtypes and bytes (first 16 hex digits)."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _records(module: Any) -> list[InstalledHook]:
    found = getattr(module, ATTR, None)
    found = found if isinstance(found, list) else [found]  # a denoiser holds a list (stacking hooks), an encoder one record
    return [h for h in found if isinstance(h, InstalledHook)]


def installed(pipe: Any) -> list[InstalledHook]:
    """The erasekit hooks on the pipeline's text encoders and UNet, in the order they were applied."""
    return [h for name in (*TEXT_ENCODERS, *DENOISERS) for h in _records(getattr(pipe, name, None))]


def _forward_hook(transform: Transform) -> Callable[..., Any]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return transform(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):  # older CLIP and T5 blocks return tuples
            return (transform(output[0]), *output[1:])
        raise ErasekitError(f"the hooked {type(module).__name__} returned a {type(output).__name__}, not hidden states; this encoder is not supported by hooks")

    return hook


def install(pipe: Any, tensors: dict[str, torch.Tensor], spec: Any) -> InstalledHook:
    """Put the hook ``spec`` describes on its layer; refuse a pipeline that already carries an erasekit hook."""
    if _installs(check_spec(spec)):
        module, installer = prepare_denoiser(pipe, tensors, spec)
        stamp = fingerprint(tensors, spec)
        _refuse_second(pipe, spec["type"], stamp)
        record = InstalledHook(dict(spec), stamp, Handles(installer()))
        setattr(module, ATTR, [*_records(module), record])
        return record
    layer, index, transform = prepare(pipe, tensors, spec)
    assert transform is not None
    _refuse_second(pipe)
    # first in line: transformers 5 records ``hidden_states`` (SDXL's penultimate layer, clip skip) by its own forward hooks
    handle = layer.register_forward_hook(_forward_hook(transform), prepend=True)
    record = InstalledHook({**spec, "layer": index}, fingerprint(tensors, spec), handle)
    setattr(getattr(pipe, spec["encoder"]), ATTR, record)
    return record


def check_installable(pipe: Any, tensors: dict[str, torch.Tensor], spec: Any) -> None:
    """Refuse, before anything changes, a hook that :func:`install` would refuse (a second hook, the same one twice)."""
    spec = check_spec(spec)
    if _installs(spec):
        _refuse_second(pipe, spec["type"], fingerprint(tensors, spec))
    else:
        _refuse_second(pipe)


def _refuse_second(pipe: Any, kind: str | None = None, stamp: str | None = None) -> None:
    present = installed(pipe)
    if any(h.fingerprint == stamp for h in present):
        raise ErasekitError("this hook is already on the pipeline; applying it twice would double its effect (erasekit.remove(pipe) takes hooks off)")
    stacks = kind is not None and HOOK_TYPES[kind].stacks
    if present and not (stacks and all(h.spec["type"] == kind for h in present)):
        raise ErasekitError(f"this pipeline already carries an erasekit hook ({present[0].describe()}); take it off with erasekit.remove(pipe) first"
                            + (f" (only {kind} hooks combine with each other)" if stacks else ""))


def take_off(pipe: Any, only: str | None = None) -> int:
    """Remove the pipeline's erasekit hooks (``only``: just the one with that fingerprint); returns how many came off."""
    removed = 0
    for name in (*TEXT_ENCODERS, *DENOISERS):
        module = getattr(pipe, name, None)
        records = _records(module)
        gone = [h for h in records if only is None or h.fingerprint == only]
        for record in gone:
            record.handle.remove()
        removed += len(gone)
        if gone and len(gone) == len(records):
            delattr(module, ATTR)
        elif gone:
            setattr(module, ATTR, [h for h in records if h not in gone])
    return removed


def remove(pipe: Any) -> int:
    """Take every erasekit hook off ``pipe``; returns how many there were (weights and LoRA deltas are not undone: load the base)."""
    return take_off(pipe)


def generation_hash(pipe: Any) -> str:
    """What decides a pipeline's images: :func:`~erasekit.models.weights_hash`, plus the fingerprint of any hook on it."""
    from erasekit.models import weights_hash

    return "+".join([weights_hash(pipe), *(f"hook:{h.fingerprint}" for h in installed(pipe))])


def hook_result(
    pipe: Any, hook_type: str, tensors: dict[str, torch.Tensor], concepts: tuple[str, ...] | list[str] | str = (),
    encoder: str = "text_encoder", layer: int = -1, settings: dict[str, Any] | None = None, method: str | None = None,
    base_hash: str = "",
) -> Any:
    """An ErasureResult of kind ``hook`` for ``pipe`` (checked against it now; the pipeline is left unchanged).

    ``base_hash``: the base weights' hash taken before a run that released the text encoder (else hashed now).
    """
    from erasekit.families import family_of
    from erasekit.models import model_id, weights_hash
    from erasekit.result import ErasureResult

    spec = {"type": hook_type, "encoder": encoder, "layer": layer, "settings": dict(settings or {})}
    _, index, _ = prepare(pipe, tensors, spec)
    return ErasureResult(
        method=method or hook_type, concepts=(concepts,) if isinstance(concepts, str) else tuple(concepts),
        delta={k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, kind="hook",
        config={}, base_model_id=model_id(pipe), base_hash=base_hash or weights_hash(pipe), family=family_of(pipe).name,
        hook={**spec, "layer": index},
    )


# -- the hook types -------------------------------------------------------------------------------------------------


def project_out(tensors: dict[str, torch.Tensor], settings: dict[str, Any], width: int) -> Transform:
    """h - scale · P(h - mean): remove the hidden states' component along the span of the saved ``directions``.

    ``directions`` (k x width, any non-degenerate rows; orthonormalised here) span the concept subspace P projects
    onto; an optional ``mean`` (width) centres it, which with the class-mean difference as the direction is
    LEACE's affine erasure (Belrose et al. 2023, eq. 3) restricted to one layer. ``scale`` 1 removes the component.
    """
    if unknown := sorted(set(tensors) - {"directions", "mean"}):
        raise ErasekitError(f"project-out takes the tensors directions and mean, not {', '.join(unknown)}")
    if unknown := sorted(set(settings) - {"scale"}):
        raise ErasekitError(f"project-out takes the setting scale, not {', '.join(unknown)}")
    scale = settings.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and 0 <= scale <= 2):
        raise ErasekitError(f"project-out's scale must be a number in 0 .. 2 (1 removes the component), got {scale!r}")
    if "directions" not in tensors:
        raise ErasekitError("project-out needs a 'directions' tensor (k x width); save the concept directions with the hook")
    directions = tensors["directions"].double()
    directions = directions.unsqueeze(0) if directions.dim() == 1 else directions
    if directions.dim() != 2 or directions.shape[1] != width or not 1 <= directions.shape[0] <= width:
        raise ErasekitError(f"project-out's directions must be k x {width} (this layer's width), got {tuple(tensors['directions'].shape)}")
    mean = tensors.get("mean")
    if mean is not None and tuple(mean.shape) != (width,):
        raise ErasekitError(f"project-out's mean must have {width} entries (this layer's width), got shape {tuple(mean.shape)}")
    if not torch.isfinite(directions).all() or (mean is not None and not torch.isfinite(mean).all()):
        raise ErasekitError("project-out's tensors hold NaN or infinite values; the delta is damaged")
    basis, r = torch.linalg.qr(directions.T)
    if r.diagonal().abs().min() <= 1e-6 * directions.norm(dim=1).max():
        raise ErasekitError("project-out's directions are zero or linearly dependent; save independent directions")
    basis_f = basis.float()
    centre = mean.float() if mean is not None else None
    factor = float(scale)

    def transform(hidden: torch.Tensor) -> torch.Tensor:
        b = basis_f.to(hidden.device)
        x = hidden.float()
        coords = (x - centre.to(hidden.device) if centre is not None else x) @ b
        return (x - factor * coords @ b.T).to(hidden.dtype)

    return transform


register_hook_type("project-out", project_out, "subtract the hidden states' component along saved unit directions (scale 0..2)")
register_hook_type("itd", "erasekit.methods.itd:build_itd_hook", "ItD: the concept's sparse-autoencoder features scaled down in prompts that carry it")
register_hook_type("spm", "erasekit.methods.spm_adapter:build_spm_hook", "SPM: rank-1 adapters on the UNet, each prompt's strength set by its similarity to the erased concept", on="denoiser", stacks=True)
register_hook_type("negative-prompt", "erasekit.methods.negative_prompt:build_negative_prompt",
                   "a negative prompt: the empty prompt of the unconditional branch is read as saved token ids (Geom-Erasing)", on="text-encoder-input")
