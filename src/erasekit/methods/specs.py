"""The method registry, importable without torch: specs name their config class and fit function by dotted path.

`erasekit methods`, `--help` and a misspelt ``--method`` read only this module and :mod:`erasekit.methods.catalog`;
a spec's config class and fit function are imported the first time a run asks for them.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from erasekit.errors import ErasekitError, SettingError

Method = Callable[..., Any]  # fit(pipe, request, config, progress) -> ErasureResult; methods.base.Method is the full Protocol

KINDS = ("fine-tune", "closed-form", "inference-time", "text-encoder")
DIFFUSION_FAMILIES = ("sd", "sdxl", "sd3", "flux")  # erasekit.families: one denoising engine, so a trained method runs on all
ALL_FAMILIES = DIFFUSION_FAMILIES  # what "every family" means for a diffusion method (the name the catalog and older code use)
AUTOREGRESSIVE_FAMILIES = ("janus",)  # erasekit.autoregressive: image tokens drawn one by one; methods of their own (ear)
FAMILIES = DIFFUSION_FAMILIES + AUTOREGRESSIVE_FAMILIES  # every family a method may declare, in the order `erasekit methods` shows them


def _resolve(ref: Any) -> Any:
    """An object, or the object a ``"package.module:name"`` string names (imported on first use)."""
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: name, summary, config class, fit function, budget presets, and what it can do.

    The capabilities are what the CLI and the tests read (never the config's fields): the model families
    it runs on, its kind, whether it checkpoints and resumes, trains LoRA, splits a batch across processes.
    ``config_ref`` and ``fit_ref`` are the objects or their ``"module:name"`` paths (see :attr:`config_class`, :attr:`fit`).
    """

    name: str
    summary: str
    config_ref: Any
    fit_ref: Any
    presets: dict[str, dict[str, Any]]
    families: tuple[str, ...] = ("sd",)
    kind: str = "fine-tune"
    checkpointable: bool = False
    lora: bool = False
    distributed: bool = False

    @property
    def autoregressive(self) -> bool:
        """Whether the method runs on autoregressive models (Janus) rather than diffusion pipelines (a spec is one or the other)."""
        return set(self.families) <= set(AUTOREGRESSIVE_FAMILIES)

    @property
    def config_class(self) -> type:
        """The method's settings dataclass (its module is imported on first use)."""
        found: type = _resolve(self.config_ref)
        return found

    @property
    def fit(self) -> Method:
        """The method's fit function (its module, and torch, are imported on first use)."""
        found: Method = _resolve(self.fit_ref)
        return found


_REGISTRY: dict[str, MethodSpec] = {}


def _add(spec: MethodSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} registered twice")
    if spec.kind not in KINDS or not spec.families or not set(spec.families) <= set(FAMILIES):
        raise ValueError(f"method {spec.name!r}: unknown kind {spec.kind!r} or family in {spec.families}")
    if set(spec.families) & set(AUTOREGRESSIVE_FAMILIES) and set(spec.families) & set(DIFFUSION_FAMILIES):
        raise ValueError(f"method {spec.name!r} declares diffusion and autoregressive families {spec.families}; one fit cannot serve both engines")
    _REGISTRY[spec.name] = spec


def declare_method(name: str, summary: str, config: str, fit: str, presets: dict[str, dict[str, Any]] | None = None, **capabilities: Any) -> None:
    """Register a method by the dotted paths (``"module:name"``) of its config class and fit function."""
    _add(MethodSpec(name, summary, config, fit, presets or {}, **capabilities))


def register_method(
    name: str, summary: str, config_class: type, presets: dict[str, dict[str, Any]] | None = None, **capabilities: Any
) -> Callable[[Method], Method]:
    """Decorator: register ``fit`` under ``name`` (unique, lower-case, dash-separated) with its capabilities."""

    def wrap(fit: Method) -> Method:
        _add(MethodSpec(name, summary, config_class, fit, presets or {}, **capabilities))
        return fit

    return wrap


def registry() -> dict[str, MethodSpec]:
    """All registered methods by name."""
    return dict(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """Look a method up, with a one-line error listing the known names."""
    if not isinstance(name, str):  # a list or None would not even hash; say what is expected
        raise SettingError("method", f"{{name}} must be one method's name (a string), got {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    if name not in _REGISTRY:
        raise ErasekitError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_config(spec: MethodSpec, budget: str | None = None, **overrides: Any) -> Any:
    """Build a method's config: paper defaults, then a budget preset, then explicit overrides."""
    values: dict[str, Any] = {}
    if budget is not None and not isinstance(budget, str):
        raise SettingError("budget", f"{{name}} must be a preset's name (a string) or None, got {budget!r}; choose one of: paper, {', '.join(spec.presets)}")
    if budget:
        if budget not in spec.presets and budget != "paper":
            raise ErasekitError(f"unknown budget {budget!r} for {spec.name}; choose one of: paper, {', '.join(spec.presets)}")
        values.update(spec.presets.get(budget, {}))
    names = {f.name for f in dataclasses.fields(spec.config_class)}
    for key, value in overrides.items():
        if key not in names:
            raise ErasekitError(f"{spec.name} has no setting {key!r}; its settings are: {', '.join(sorted(names))}")
        values[key] = value
    config = spec.config_class(**values)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config
