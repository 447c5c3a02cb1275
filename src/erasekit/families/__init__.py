"""Model families: the one place that knows a pipeline's shape (SD 1.x/2.x, SDXL, SD3, FLUX.1).

``detect(folder)`` reads ``model_index.json``; ``family_of(pipe)`` looks at a loaded pipeline;
``get_family(name)`` resolves ``--family``. ``tiny.build_tiny`` saves a tiny random pipeline of each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError
from erasekit.families.base import Cond, Family, Level, Pipeline, Schedule

__all__ = ["Cond", "Family", "Level", "Pipeline", "Schedule", "detect", "families", "family_of", "get_family"]


def families() -> dict[str, Family]:
    """Every supported family by name, in the order `erasekit methods` shows them."""
    from erasekit.families.flow import SD3, Flux
    from erasekit.families.unet import SD, SDXL

    return {f.name: f for f in (SD(), SDXL(), SD3(), Flux())}


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.label})" for f in families().values())


def get_family(name: str) -> Family:
    """The family called ``name``, or a one-line error naming the supported ones."""
    found = families().get(name.strip().lower())
    if found is None:
        raise ErasekitError(f"unknown family {name!r}; supported: {_supported()}")
    return found


def _by_class(class_name: str, where: str) -> Family:
    for family in families().values():
        if class_name in family.pipeline_classes:
            return family
    raise ErasekitError(f"{where} is a {class_name or 'pipeline of unknown class'}, which erasekit does not support; supported: {_supported()}")


def detect(folder: str | Path, forced: str | None = None) -> Family:
    """The family of a diffusers folder (its ``model_index.json``); ``forced`` (``--family``) must agree with it."""
    index = Path(folder) / "model_index.json"
    try:
        class_name = str(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError) as exc:
        raise ErasekitError(f"cannot read {index} ({exc.__class__.__name__}); pass a diffusers pipeline folder") from None
    found = _by_class(class_name, str(folder))
    if forced is not None and get_family(forced).name != found.name:
        raise ErasekitError(f"--family {forced} contradicts {folder}, which holds a {class_name} ({found.name}); drop --family or pass the right folder")
    return found


def family_of(pipe: Any) -> Family:
    """The family of a loaded pipeline, by its class."""
    return _by_class(type(pipe).__name__, "this pipeline")
