"""Range checks the settings dataclasses' ``validate()`` share, and JSON that never holds NaN.

Each refusal is one :class:`~erasekit.errors.SettingError` line that names the setting (the keyword in Python,
the flag on the command line) and states the range. The bounds below are generous: every value the papers or
the presets use is far inside them; outside them a run diverges, produces NaN, or cannot finish.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import typing
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError, SettingError

MAX_SEED = 2**63 - 1  # torch, numpy and scikit-learn all take seeds in 0 .. 2**63 - 1
MAX_GUIDANCE = 50.0  # CFG scales in use are 1 .. 20; far above, images saturate, and at 1e30 the sampler gives NaN
MAX_ITERATIONS = 100_000  # 100 x the papers' 1000 steps; more cannot finish on any machine this runs on
MAX_LR = 1.0  # Adam steps above 1 diverge at once (the papers use 1e-6 .. 1e-2)
MAX_WEIGHT = 1000.0  # loss weights (the papers use 0.1 .. 10)
MAX_LORA_RANK = 1024
# closed-form weights (UCE/RECE's lambda, s_e, s_p, RECE's reg; the papers use 1e-3 .. 1): above MAX_SCALE one term
# swamps the others (and near 1e300 the Gram matrix overflows); below MIN_REGULARISER the solve is ill-conditioned
# wherever the keys do not span the embedding space (a few keys in 768 dimensions: almost everywhere)
MAX_SCALE = 1e6
MIN_REGULARISER = 1e-6


def _allowed(kind: Any) -> tuple[type, ...] | None:
    """The value types a field annotated ``kind`` accepts, or None for a type this check leaves alone."""
    simple = {int: (numbers.Integral,), float: (numbers.Real,), bool: (bool,), str: (str,)}
    if kind in simple:
        return simple[kind]
    args = typing.get_args(kind)
    if type(None) in args and len(args) == 2:  # Optional[X]
        inner = _allowed(next(a for a in args if a is not type(None)))
        return None if inner is None else (*inner, type(None))
    return None


def _type_name(kind: Any) -> str:
    names = {int: "a whole number", float: "a number", bool: "True or False", str: "a string"}
    args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    return names.get(args[0], getattr(args[0], "__name__", str(args[0]))) + (" or None" if type(None) in typing.get_args(kind) else "")


def check_fields(config: Any) -> None:
    """Refuse a field whose value is not of its declared type (int, float, bool, str, or None where optional), or a non-finite float."""
    try:
        hints = typing.get_type_hints(type(config))
    except (NameError, TypeError):  # an annotation that cannot be resolved here: check nothing rather than guess
        return
    for f in dataclasses.fields(config):
        kind, value = hints.get(f.name), getattr(config, f.name)
        allowed = _allowed(kind)
        if allowed is None:
            continue
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if wrong_bool or not isinstance(value, allowed):
            raise SettingError(f.name, f"{{name}} must be {_type_name(kind)}, got {value!r}")
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
            raise SettingError(f.name, f"{{name}} must be a finite number, got {value!r}")


def check_seed(name: str, value: int) -> None:
    """Refuse a seed outside 0 .. 2**63 - 1 (the range every random generator used here takes)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_SEED:
        raise SettingError(name, f"{{name}} must be a whole number in 0 .. 2**63 - 1, got {value!r}")


def check_between(name: str, value: float, low: float, high: float, low_open: bool = False, why: str = "") -> None:
    """Refuse ``value`` outside [low, high] (``(low, high]`` when ``low_open``); NaN is always outside."""
    inside = (low < value if low_open else low <= value) and value <= high
    if not inside:
        span = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise SettingError(name, f"{{name}} must be {span}{f' ({why})' if why else ''}, got {value!r}")


def check_scale(name: str, value: float) -> None:
    """Refuse a closed-form preserve weight above MAX_SCALE; a negative one is the old UCE code's max(0.1, 1/|retain|)."""
    if not value <= MAX_SCALE:
        raise SettingError(name, f"{{name}} must be <= {MAX_SCALE:g} (a negative value picks the old code's max(0.1, 1/|retain|)), got {value!r}")


def _non_finite(obj: Any, path: str = "") -> str | None:
    """The path of the first NaN or infinity inside ``obj`` (dicts, lists, tuples), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return path or "the value"
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        if (found := _non_finite(value, f"{path}.{key}" if path else str(key))) is not None:
            return found
    return None


def strict_json(obj: Any, what: str, hint: str = "", **options: Any) -> str:
    """``json.dumps(obj, allow_nan=False, **options)``; a NaN or infinity is a one-line error naming where it is in ``what``."""
    where = _non_finite(obj)
    if where is not None:
        raise ErasekitError(f"{what} would hold a non-finite number at {where}; nothing was written{f': {hint}' if hint else ''}")
    try:
        return json.dumps(obj, allow_nan=False, **options)
    except ValueError as exc:  # a non-finite number inside an object json turned into a string some other way
        raise ErasekitError(f"{what} cannot be written as JSON ({exc}); nothing was written") from None


def usable_path(path: Any, what: str = "path") -> Path:
    """``path`` as a Path, or one line when the system cannot even look at it (a name too long, a folder without access)."""
    import os

    path = Path(path)
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # absent is for the caller to judge
    except OSError as exc:
        shown = str(path) if len(str(path)) <= 80 else str(path)[:77] + "..."
        raise ErasekitError(f"cannot use the {what} {shown}: {exc.strerror or exc}; choose another") from None
    except ValueError as exc:  # an embedded NUL byte
        raise ErasekitError(f"cannot use the {what} {str(path)[:80]!r}: {exc}") from None
    return path


def check_device(device: Any, available: bool = True) -> str:
    """``device`` if it names a torch device (cpu, cuda, cuda:1, mps) and, when ``available``, one this machine has; else one line."""
    import torch

    try:
        parsed = torch.device(str(device).strip())
    except (RuntimeError, ValueError, TypeError):
        raise SettingError("device", f"{{name}} {device!r} is not a torch device; pass cpu, cuda, cuda:N or mps") from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise SettingError("device", f"{{name}} {device!r} is not supported; pass cpu, cuda, cuda:N or mps")
    if not available:
        return str(device).strip()
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type == "cuda" and (count == 0 or (parsed.index or 0) >= count):
        found = f"{count} CUDA device(s) (cuda:0 .. cuda:{count - 1})" if count else "no CUDA device"
        raise SettingError("device", f"{{name}} {device} is not available: this machine has {found}; pass cpu or an existing device")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError("device", f"{{name}} {device} is not available on this machine; pass cpu")
    return str(device).strip()
