"""erasekit: erase concepts from text-to-image diffusion models without breaking their neighbours.

The public API is imported lazily, so `erasekit --help` and `import erasekit` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ErasekitError": "erasekit.errors",
    "ErasureResult": "erasekit.result",
    "load": "erasekit.result",
    "load_result": "erasekit.result",
    "remove": "erasekit.hooks",
    "hook_result": "erasekit.hooks",
    "register_hook_type": "erasekit.hooks",
    "load_pipeline": "erasekit.models",
    "toy_pipeline": "erasekit.models",
    "load_janus": "erasekit.autoregressive",
    "erase": "erasekit.api",
    "available_methods": "erasekit.api",
    "evaluate": "erasekit.eval.runner",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import public names on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'erasekit' has no attribute {name!r}")
