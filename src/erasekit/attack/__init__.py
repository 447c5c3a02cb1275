"""Adversarial prompt search against an erased model (UnlearnDiffAtk-style discrete token search).

``attack(target, concept)`` runs the whole protocol on a run folder or delta file; ``attack_pipeline``
attacks a pipeline in memory (for ``compare --attack``); ``search_tokens`` is the optimisation itself. On a Janus
(autoregressive) model :mod:`erasekit.attack.janus_run` and :mod:`erasekit.attack.janus_search` do the same.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AttackConfig", "attack", "attack_pipeline", "search_tokens"]


def __getattr__(name: str) -> Any:
    # lazy: importing the package (e.g. for the CLI) must not import torch/diffusers
    if name in ("AttackConfig", "attack", "attack_pipeline"):
        from erasekit.attack import run

        return getattr(run, name)
    if name == "search_tokens":
        from erasekit.attack.search import search_tokens

        return search_tokens
    raise AttributeError(f"module 'erasekit.attack' has no attribute {name!r}")
