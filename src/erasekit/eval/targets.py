"""What ``erasekit.evaluate`` accepts as TARGET from Python: what the CLI takes, plus an ErasureResult or a pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError, SettingError


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a loaded model: a diffusers pipeline (of any family) or a loaded Janus (autoregressive)."""
    from diffusers import DiffusionPipeline

    from erasekit.autoregressive.janus import Janus

    return isinstance(obj, (DiffusionPipeline, Janus))


def resolve_any(target: Any, model: Any = None) -> tuple[Any, Any]:
    """The :class:`~erasekit.eval.runner.Target` TARGET names, and the pipeline the caller gave (None: load the base by name).

    TARGET: a run folder, a delta file or a base model name (str or Path), an ErasureResult, or a pipeline;
    ``model``: the base of a delta, by name or as a pipeline.
    """
    from erasekit.eval.runner import Target, resolve_target
    from erasekit.models import model_id
    from erasekit.result import ErasureResult

    given = model if is_pipeline(model) else None
    if model is not None and given is None and not isinstance(model, (str, Path)):
        raise SettingError("model", f"{{name}} must be a model name, a diffusers folder or a pipeline, got {type(model).__name__}")
    name = model_id(given) if given is not None else (str(model) if model is not None else None)
    if isinstance(target, ErasureResult):
        base = name or target.base_model_id
        if not base or base == "unknown":
            raise SettingError("model", "this ErasureResult does not say which base model it was made from; pass {name} (a pipeline or a model name)")
        return Target(base, None, None, target), given
    if is_pipeline(target):
        if model is not None:
            raise SettingError("model", "TARGET is already a pipeline (a base model); {name} is only for the base of a delta or an ErasureResult")
        return Target(model_id(target)), target
    if isinstance(target, (str, Path)):
        found = resolve_target(str(target), name)
        if given is not None and found.result is None:
            raise SettingError("model", f"TARGET {str(target)!r} is a base model; {{name}} is only for the base of a delta or an ErasureResult")
        return found, given
    raise ErasekitError(f"cannot evaluate a {type(target).__name__}; pass a run folder, a delta file, a model name, an ErasureResult or a pipeline")


def describe(target: Any) -> str:
    """TARGET as the evaluation record names it: the path or name given, or what the object is."""
    from erasekit.result import ErasureResult

    if isinstance(target, ErasureResult):
        return f"ErasureResult ({target.method}: erased {', '.join(target.concepts)})"
    if is_pipeline(target):
        from erasekit.models import model_id

        return f"pipeline ({model_id(target)})"
    return str(target)


@contextmanager
def kept_as_it_was(pipe: Any, result: Any = None) -> Iterator[None]:
    """Restore ``pipe`` afterwards (the evaluation applies ``result`` to it in place); None: nothing to keep.

    The denoiser's weights always come back, a text encoder's when ``result`` changes it, and a hook put on meanwhile comes off.
    """
    if pipe is None:
        yield
        return
    from erasekit.autoregressive.janus import Janus

    if isinstance(pipe, Janus):
        with _janus_kept(pipe, result):
            yield
        return
    from erasekit.delta_keys import components, touched
    from erasekit.hooks import installed, take_off

    kept = {"unet" if hasattr(pipe, "unet") else "transformer"}
    if result is not None:
        kept |= touched(result.delta, result.kind)
    modules = {name: module for name, module in components(pipe).items() if name in kept}
    saved = {name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name, module in modules.items()}
    hooks_before = {h.fingerprint for h in installed(pipe)}
    try:
        yield
    finally:
        for hook in installed(pipe):
            if hook.fingerprint not in hooks_before:
                take_off(pipe, only=hook.fingerprint)
        for name, module in modules.items():
            module.load_state_dict(saved[name])


@contextmanager
def _janus_kept(janus: Any, result: Any) -> Iterator[None]:
    """Restore the Janus parameters ``result`` writes (a weights delta of them) afterwards."""
    import torch

    from erasekit.autoregressive.delta import PREFIX

    params = dict(janus.model.named_parameters())
    names = [k.removeprefix(PREFIX) for k in (result.delta if result is not None else {}) if k.removeprefix(PREFIX) in params]
    saved = {name: params[name].detach().clone() for name in names}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def check_keywords(out_json: Any, cache_dir: Any, erased: Any) -> list[str] | None:
    """Refuse keyword arguments of ``evaluate`` of the wrong kind (one line each); ``erased`` as a list (a str is one concept)."""
    import os

    for name, value, flag in (("out_json", out_json, "--json"), ("cache_dir", cache_dir, "--cache-dir")):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise SettingError(name, f"{{name}} must be a path (str or Path), got {type(value).__name__}", flag=flag)
    if erased is None:
        return None
    concepts = [erased] if isinstance(erased, str) else erased
    if not isinstance(concepts, (list, tuple)) or not all(isinstance(c, str) for c in concepts):
        raise SettingError("erased", f"{{name}} must be a concept or a list of concepts (str), got {erased!r}")
    return list(concepts)
