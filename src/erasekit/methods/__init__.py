"""Erasure methods behind one interface; `catalog` declares the built-in ones without importing torch.

A method's module (and torch) loads when a run asks for its config class or fit function, so listing the
methods or rejecting a misspelt name is instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from erasekit.methods import catalog  # noqa: F401  (declares the built-in methods)
from erasekit.methods.specs import get_method, make_config, register_method, registry

if TYPE_CHECKING:
    from erasekit.methods.base import ErasureRequest

__all__ = ["ErasureRequest", "get_method", "make_config", "register_method", "registry"]


def __getattr__(name: str) -> Any:
    """``ErasureRequest`` on first use (its module imports torch)."""
    if name == "ErasureRequest":
        from erasekit.methods.base import ErasureRequest

        return ErasureRequest
    raise AttributeError(f"module 'erasekit.methods' has no attribute {name!r}")
