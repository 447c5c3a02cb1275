"""The library entry point: ``erasekit.erase``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from erasekit.errors import ErasekitError, SettingError
from erasekit.methods import ErasureRequest, get_method, make_config
from erasekit.methods.base import Progress
from erasekit.result import ErasureResult


def erase(
    pipe: Any,
    concepts: str | Sequence[str],
    method: str = "eap",
    config: Any = None,
    preserve: str | Sequence[str] | None = (),
    budget: str | None = None,
    progress: Progress | None = None,
    checkpoint: Any = None,
    release_unused: bool = False,
    allow_unknown: bool = False,
    **overrides: Any,
) -> ErasureResult:
    """Erase ``concepts`` from ``pipe`` (any supported family); the pipeline is left unchanged, apply with ``result.apply(pipe)``.

    ``pipe`` is a diffusers pipeline (the diffusion methods) or a loaded :class:`erasekit.autoregressive.Janus` (the
    autoregressive ones, e.g. ``ear``); a method given a model of the other kind is refused in one line.

    ``checkpoint`` (a :class:`erasekit.methods.checkpoint.CheckpointSpec`) saves the run there and resumes from it.
    ``release_unused=True`` says the caller is done with ``pipe``: the fine-tuning methods then free its text
    encoder and VAE once their embeddings are computed, so one model's weights stay in memory while training.
    Concepts that cannot be what was meant are refused (:func:`erasekit.concepts.check_targets`): a comma inside one,
    one both erased and preserved, and on the toy model a word outside its vocabulary; ``allow_unknown=True`` lets
    the first and the last through.
    """
    spec = get_method(method)
    targets = _texts(concepts, "concepts")
    preserve = _texts(preserve, "preserve") if preserve is not None else ()
    _check_arguments(progress, checkpoint, release_unused=release_unused, allow_unknown=allow_unknown)
    check_family(spec.name, spec.families, *family_of_model(pipe))
    if not targets:
        raise ErasekitError("no concept to erase; give at least one")
    from erasekit.concepts import check_prompt, check_targets
    from erasekit.models import TOY_MODELS, model_id, weights_hash

    # made once here for every method: the checked prompts and the base weights' hash
    targets = tuple(check_prompt(pipe, t, "concept") for t in targets)
    preserve = tuple(check_prompt(pipe, p, "preserve concept") for p in preserve)
    toy = model_id(pipe) in TOY_MODELS
    check_targets(targets, preserve, toy=toy, allow_unknown=allow_unknown)
    if config is None:
        if budget is None and toy and "toy" in spec.presets:
            budget = "toy"  # as the CLI does on --model toy: the paper's sizes (K = 1000 candidates ...) do not fit the toy world
        config = make_config(spec, budget, **overrides)
    elif overrides or budget:
        raise ErasekitError("pass either a config object or keyword settings, not both")
    elif not isinstance(config, spec.config_class):
        raise ErasekitError(f"config must be a {spec.config_class.__name__} for method {method!r}, got {type(config).__name__}")
    elif (validate := getattr(config, "validate", None)) is not None:
        validate()  # a config object built by hand gets the same checks as keyword settings
    if (check := getattr(config, "check_concepts", None)) is not None:
        check(targets)
    if (check_model := getattr(config, "check_model", None)) is not None:
        check_model(pipe)  # settings that depend on the loaded model (EAR: a window no wider than the image)
    request = ErasureRequest(targets=targets, preserve=preserve, checkpoint=checkpoint, release_unused=release_unused, base_hash=weights_hash(pipe))
    with flush_denormals():
        return spec.fit(pipe, request, config, progress)


def family_of_model(pipe: Any) -> tuple[str, str]:
    """The family name and label of a loaded model: a diffusers pipeline's family, or janus for a loaded Janus."""
    from erasekit.autoregressive.janus import Janus

    if isinstance(pipe, Janus):
        return "janus", "Janus (autoregressive)"
    from erasekit.families import family_of

    family = family_of(pipe)
    return family.name, family.label


# Why a diffusion method that carries over to image tokens is not registered for the autoregressive family (issue 21, item 4).
_ESD = "ESD's objective on image tokens is `ear --no-windowed --no-masking`, the EAR paper's ESD-style ablation"
ON_AUTOREGRESSIVE = {
    "esd-x": _ESD, "esd-u": _ESD,
    "eap": "EAP's adversarial preservation on token predictions is not built yet: ear erases without a preservation term",
    "eap-pgd": "EAP's adversarial preservation on token predictions is not built yet: ear erases without a preservation term",
}


def check_family(method: str, families: Sequence[str], found: str, label: str) -> None:
    """Refuse, in one line, a method on a model of a family it does not declare (diffusion and autoregressive told apart)."""
    from erasekit.methods.specs import AUTOREGRESSIVE_FAMILIES, registry

    if found in families:
        return
    supported = ", ".join(families)
    if set(families) <= set(AUTOREGRESSIVE_FAMILIES):
        raise ErasekitError(f"{method} erases autoregressive models ({supported}); this is a {label} diffusion pipeline ({found}): "
                            "use a diffusion method such as esd-x, or pass a Janus model")
    if found in AUTOREGRESSIVE_FAMILIES:
        ours = sorted(n for n, s in registry().items() if found in s.families)
        why = ON_AUTOREGRESSIVE.get(method, "")
        raise ErasekitError(f"{method} erases diffusion pipelines ({supported}); this is a {label} model: use {' or '.join(ours) or 'another method'}"
                            + (f" ({why})" if why else ""))
    raise ErasekitError(f"{method} does not run on {label} models yet; it supports: {supported} (see `erasekit methods`)")


def check_model_family(spec: Any, model: str) -> None:
    """:func:`check_family` for a ``--model`` value, where its family is known without loading it (toy, toy-janus, a folder)."""
    from erasekit.models import model_family

    found = model_family(model)
    if found is None and model and os.path.isfile(os.path.join(model, "model_index.json")):
        from erasekit.families import detect

        try:
            found = detect(model).name
        except ErasekitError:
            return  # load_pipeline says what is wrong with the folder, in its own words
    if found is not None:
        label = "Janus (autoregressive)" if found == "janus" else _label(found)
        check_family(spec.name, spec.families, found, label)


def _label(name: str) -> str:
    from erasekit.families import get_family

    return get_family(name).label


def _texts(value: Any, keyword: str) -> tuple[str, ...]:
    """``value``, one string or a list of them, as a tuple of strings; anything else is one line naming ``keyword``."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (bytes, bytearray, Mapping)) or not isinstance(value, Iterable):
        raise SettingError(keyword, f"{{name}} must be a string or a list of strings, got {value!r} ({type(value).__name__})")
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise SettingError(keyword, f"{{name}} must be a string or a list of strings; item {i} is {item!r} ({type(item).__name__})")
    return items


def _check_arguments(progress: Any, checkpoint: Any, **flags: Any) -> None:
    """Refuse a ``progress`` that cannot be called, a ``checkpoint`` that is no CheckpointSpec, and flags that are not True or False."""
    if progress is not None and not callable(progress):
        raise SettingError("progress", f"{{name}} must be a function progress(step, total, record) or None, got {progress!r}")
    from erasekit.methods.checkpoint import CheckpointSpec

    if checkpoint is not None and not isinstance(checkpoint, CheckpointSpec):
        raise SettingError("checkpoint", f"{{name}} must be an erasekit.methods.checkpoint.CheckpointSpec(folder, every) or None, got {checkpoint!r}")
    for keyword, value in flags.items():
        if not isinstance(value, bool):
            raise SettingError(keyword, f"{{name}} must be True or False, got {value!r}")


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero on CPU while a method trains (x86 FTZ/DAZ), then restore torch's default (off).

    Arithmetic on denormal numbers is many times slower on x86 CPUs, and a run whose activations or
    Adam moments drift into them slows down for no gain. Values below about 1e-38 are all it changes.
    """
    import torch

    switched = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if switched:
            torch.set_flush_denormal(False)


def available_methods() -> dict[str, str]:
    """Registered method names and their one-line summaries."""
    from erasekit.methods import registry

    return {name: spec.summary for name, spec in registry().items()}
