"""erasekit: erase concepts from text-to-image diffusion models without breaking their neighbours."""

from __future__ import annotations

__version__ = "0.1.0"

from erasekit.errors import ErasekitError  # noqa: E402
from erasekit.models import load_pipeline, toy_pipeline  # noqa: E402
from erasekit.result import ErasureResult, load, load_result  # noqa: E402

__all__ = [
    "ErasekitError",
    "ErasureResult",
    "__version__",
    "erase",
    "load",
    "load_pipeline",
    "load_result",
    "toy_pipeline",
    "available_methods",
]


def erase(pipe, concepts, method: str = "eap", config=None, **kwargs):  # type: ignore[no-untyped-def]
    """Erase ``concepts`` from ``pipe`` with a registered method; returns an :class:`ErasureResult`."""
    from erasekit.api import erase as _erase

    return _erase(pipe, concepts, method=method, config=config, **kwargs)


def available_methods() -> dict[str, str]:
    """Registered method names and their one-line summaries."""
    from erasekit.methods import registry

    return {name: spec.summary for name, spec in registry().items()}
