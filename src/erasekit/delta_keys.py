"""Which pipeline tensor each key of a delta names, checked for every key before anything changes.

A key is ``<component>.<name>``: the component is the pipeline's denoiser (``unet`` or ``transformer``) or one of
its text encoders (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``); the name is a parameter of it
(``weights`` deltas) or a diffusers-format LoRA key of it (``lora`` deltas, as ``pipe.load_lora_weights`` reads them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from erasekit.errors import ErasekitError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
LORA_MARKS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.down.", ".lora_linear_layer.up.")


def components(pipe: Any) -> dict[str, nn.Module]:
    """The modules a delta may change, by key prefix: the pipeline's denoiser and each text encoder it has."""
    from erasekit.families import family_of

    found = {"unet" if hasattr(pipe, "unet") else "transformer": family_of(pipe).denoiser(pipe)}
    for name in TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            found[name] = module
    return found


def check_encoder_usable(name: str, module: nn.Module) -> None:
    """Refuse a text encoder whose weights ``release_unused`` freed (a delta or hook on it would act on nothing)."""
    from erasekit.models import is_released

    if is_released(module):
        raise ErasekitError(f"this pipeline's {name} was released by erase(..., release_unused=True); load the model again to apply a delta or hook to it")


def _component(key: str, found: dict[str, nn.Module]) -> tuple[str, nn.Module, str]:
    prefix, _, name = key.partition(".")
    if prefix not in found or not name:
        raise ErasekitError(f"the delta changes {key!r}, but this pipeline has no {prefix!r} component (it has {', '.join(found)}); "
                            "it was made for another architecture")
    if prefix in TEXT_ENCODERS:
        check_encoder_usable(prefix, found[prefix])
    return prefix, found[prefix], name


def _aliases(name: str) -> tuple[str, ...]:
    # transformers 5 flattened CLIPTextModel (no ``text_model.``): a delta written under either layout names the same tensor
    return (name, name.removeprefix("text_model."), f"text_model.{name}")


def weight_targets(pipe: Any, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameter each key of a ``weights`` delta sets, after checking every key names one of the same shape."""
    found = components(pipe)
    tables: dict[str, dict[str, torch.Tensor]] = {}
    targets = {}
    for key, value in delta.items():
        prefix, module, name = _component(key, found)
        table = tables.setdefault(prefix, dict(module.named_parameters(remove_duplicate=False)))
        target = next((table[n] for n in _aliases(name) if n in table), None)
        if target is None:
            raise ErasekitError(f"the delta changes {key!r}, which this pipeline's {prefix} does not have; it was made for another architecture")
        if target.shape != value.shape:
            raise ErasekitError(f"shape mismatch for {key}: delta {tuple(value.shape)} vs model {tuple(target.shape)}; it was made for another model size")
        targets[key] = target
    return targets


def check_lora(pipe: Any, delta: dict[str, torch.Tensor]) -> None:
    """Refuse a LoRA delta with a key of a component the pipeline's LoRA loader skips, or a text-encoder layer or shape it lacks.

    The denoiser's keys are left to diffusers' loader (their formats vary by family); a text encoder's key must name
    one of its linear layers, its ``lora_A``/``down`` matrix reading that layer's input width, ``lora_B``/``up`` writing its output width.
    """
    found = components(pipe)
    loadable = set(getattr(pipe, "_lora_loadable_modules", ()))
    modules: dict[str, dict[str, nn.Module]] = {}
    for key, value in delta.items():
        prefix, module, name = _component(key, found)
        if prefix not in loadable:
            raise ErasekitError(f"the LoRA delta changes the {prefix}, which {type(pipe).__name__}.load_lora_weights does not load "
                                f"(it loads {', '.join(sorted(loadable))}); save a text-encoder change of it as a weights delta")
        if prefix not in TEXT_ENCODERS:
            continue
        mark = next((m for m in LORA_MARKS if m in f".{name}"), None)
        if mark is None:
            raise ErasekitError(f"{key!r} is not a LoRA key (no lora_A/lora_B or lora.down/lora.up); save plain weights as a weights delta")
        path = f".{name}".split(mark)[0][1:]
        table = modules.setdefault(prefix, dict(module.named_modules()))
        # as diffusers' loader reads it: ``text_model.`` dropped for a flattened CLIP, never added
        layer = table.get(path if hasattr(module, "text_model") else path.removeprefix("text_model."))
        if not isinstance(layer, nn.Linear):
            raise ErasekitError(f"the LoRA delta changes {key!r}, but this pipeline's {prefix} has no linear layer {path!r}; it was made for another architecture")
        reads = mark in (".lora_A.", ".lora.down.", ".lora_linear_layer.down.")
        width, axis = (layer.in_features, 1) if reads else (layer.out_features, 0)
        if value.dim() != 2 or value.shape[axis] != width:
            raise ErasekitError(f"shape mismatch for {key}: LoRA matrix {tuple(value.shape)} does not fit {path} ({layer.in_features} -> {layer.out_features})")


def touched(delta: dict[str, torch.Tensor], kind: str) -> set[str]:
    """The components a delta of ``kind`` changes in place (none for a hook, which changes no weights)."""
    return set() if kind == "hook" else {key.partition(".")[0] for key in delta if not key.startswith("hook.")}  # result.HOOK_PREFIX
