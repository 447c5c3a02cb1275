"""The rows of `erasekit compare`: which methods and method variants it runs on a model, and each row's settings.

A *variant* is one more row of a method already registered, with settings of its own, so configurations of the same
method compare side by side under the same seeds (EAR against its ablations; esd-x at two learning rates)::

    --variant esd-style=ear:no-windowed,no-masking   --variant esd-x-lr5=esd-x:lr=1e-5

``NAME=METHOD[:SETTING,...]``: each SETTING is one of `erasekit erase --method METHOD`'s flags without its dashes
(``lr=1e-5``, ``no-masking``, ``windowed=false``). NAME names the row and its run folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from erasekit.errors import ErasekitError

VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9_.+-]{0,63}")  # a row label that is also a run folder name
RESERVED = ("cache", "logs")  # folders of OUT besides the run folders
VARIANT_HELP = ("A variant of a method as its own row, NAME=METHOD:SETTING,... (repeatable; SETTING as the method's erase flag without "
                "dashes), e.g. esd-style=ear:no-windowed,no-masking or esd-x-slow=esd-x:lr=1e-6.")


@dataclass(frozen=True)
class Row:
    """One row of a comparison: its name (row label, run folder), the registered method it runs, the settings of its own."""

    name: str
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def is_variant(self) -> bool:
        """Whether the row is a variant (a name of its own) rather than the method as registered."""
        return self.name != self.method


def parse_variant(item: str) -> tuple[str, str, dict[str, Any]]:
    """One ``NAME=METHOD[:SETTING,...]`` string -> (name, method, settings), every setting converted to its config field's type."""
    from erasekit.methods import get_method
    from erasekit.runs import parse_method_flags

    name, eq, rest = item.partition("=")
    method, colon, given = rest.partition(":")
    name, method = name.strip(), method.strip()
    if not (eq and name and method):
        raise ErasekitError(f"--variant expects NAME=METHOD[:SETTING,...] (e.g. esd-style=ear:no-windowed,no-masking), got {item!r}")
    flags = [f"--{s.strip()}" for s in given.split(",") if s.strip()] if given else []
    if colon and not flags:
        raise ErasekitError(f"--variant {item!r} has no setting after ':'; give METHOD:SETTING,... or drop the ':'")
    spec = get_method(method)
    try:
        settings = parse_method_flags(spec.config_class, flags)
    except ErasekitError as exc:
        raise ErasekitError(f"--variant {name}: {exc}") from None
    return name, method, settings


def parse_variants(items: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """`--variant` strings -> {name: (method, settings)} (names checked by :func:`comparison_rows`)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for item in items:
        name, method, settings = parse_variant(item)
        if name in out:
            raise ErasekitError(f"--variant {name} is given twice; give each variant its own name")
        out[name] = (method, settings)
    return out


def default_methods(model: str) -> list[str]:
    """Every registered method of the model's kind: the autoregressive ones on a Janus model, the diffusion ones otherwise."""
    from erasekit.methods import registry
    from erasekit.models import model_family

    if model_family(model) == "janus":
        return sorted(n for n, s in registry().items() if "janus" in s.families)
    return sorted(n for n, s in registry().items() if not s.autoregressive)


def comparison_rows(model: str, methods: Sequence[str] | None, variants: Mapping[str, tuple[str, Mapping[str, Any]]] | None) -> list[Row]:
    """The rows a comparison runs: the methods (default: :func:`default_methods`), then the variants; each checked against the model's family."""
    from erasekit.api import check_model_family
    from erasekit.methods import get_method, registry

    variants = dict(variants or {})
    names = list(dict.fromkeys(methods)) if methods is not None else ([] if variants else default_methods(model))
    if not names and not variants:
        raise ErasekitError(f"no method to compare; choose from: {', '.join(default_methods(model))}")
    rows = [Row(name, name) for name in names]
    for name, value in variants.items():
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], Mapping)):
            raise ErasekitError(f"variant {name!r} must be (method, settings), got {value!r}")
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            raise ErasekitError(f"variant name {name!r} must be lower-case letters, digits and . _ + - (it names a run folder), e.g. esd-style")
        if name in RESERVED:
            raise ErasekitError(f"variant name {name!r} is a folder every comparison has ({', '.join(RESERVED)}); give the variant another name")
        if name in registry() or name in names:
            raise ErasekitError(f"variant name {name!r} is a method's name; give the variant a name of its own, e.g. {name}-v2")
        rows.append(Row(name, value[0], dict(value[1])))
    for row in rows:
        check_model_family(get_method(row.method), model)  # e.g. ear on a diffusion pipeline: one line
    return rows


def row_settings(row: Row, base: Mapping[str, Any], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A row's settings: ``base`` (the seed), then `--set` on its method, then the variant's own, then `--set` on the variant's name."""
    return {**base, **overrides.get(row.method, {}), **row.settings, **(overrides.get(row.name, {}) if row.is_variant else {})}


def override_targets(rows: Sequence[Row]) -> dict[str, str]:
    """What `--set NAME.KEY=VALUE` may name: every compared method and variant, mapped to the method whose settings it takes."""
    return {**{r.method: r.method for r in rows}, **{r.name: r.method for r in rows}}


def parse_settings(items: Sequence[str], methods: Sequence[str] | Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """`METHOD.KEY=VALUE` strings -> {method: {key: value}}, converted to each config field's type.

    ``methods`` are the names `--set` may use, or a map from each (a method or a variant) to the method whose settings it takes.
    """
    from erasekit.methods import get_method
    from erasekit.runs import parse_method_flags

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, eq, value = item.partition("=")
        method, dot, key = head.partition(".")
        if not (eq and dot and method and key):
            raise ErasekitError(f"--set expects METHOD.KEY=VALUE (e.g. eap.iterations=20), got {item!r}")
        if method not in methods:
            raise ErasekitError(f"--set {item!r} names {method!r}, which is not being compared; compared: {', '.join(methods)}")
        of = methods[method] if isinstance(methods, Mapping) else method
        out.setdefault(method, {}).update(parse_method_flags(get_method(of).config_class, [f"--{key}={value}"]))
    return out


def settings_targets(model: str, methods: Sequence[str] | None, variants: Mapping[str, tuple[str, Mapping[str, Any]]]) -> dict[str, str]:
    """What the command line's `--set NAME.KEY=VALUE` may name before the rows are checked: the methods, the variants and their methods."""
    names = list(methods) if methods is not None else [] if variants else default_methods(model)
    return {**{n: n for n in names}, **{m: m for m, _ in variants.values()}, **{v: m for v, (m, _) in variants.items()}}
