"""Evaluation as code: the paper's protocols (ESR/PSR, NER, CLIP score, FID, spectrum), cached generation, reports.

Imported lazily, so `erasekit --help` stays fast.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "evaluate": "erasekit.eval.runner",
    "run_suite": "erasekit.eval.runner",
    "suites": "erasekit.eval.suites",
    "get_suite": "erasekit.eval.suites",
    "GenerationCache": "erasekit.eval.generate",
    "generate_cached": "erasekit.eval.generate",
    "write_report": "erasekit.eval.report",
    "spectrum": "erasekit.eval.spectrum",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    """Import public names on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'erasekit.eval' has no attribute {name!r}")
