"""Erasure methods behind one interface; importing this package registers them all."""

from erasekit.methods import age, ca, eap, esd, rece, uce  # noqa: F401  (registration side effects)
from erasekit.methods.base import ErasureRequest, get_method, make_config, register_method, registry

__all__ = ["ErasureRequest", "get_method", "make_config", "register_method", "registry"]
