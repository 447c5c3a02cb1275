"""The interrupted-run folder (OUT.partial) of `erasekit erase`: when it blocks a new run, and when it is only litter.

A run writes OUT.partial/request.json (with its process id) before training, and checkpoints there while it trains.
A folder with a checkpoint can resume; one whose run is still alive is in use; anything else is what a run left
when it failed before its first checkpoint, holds nothing worth keeping, and must never block the next run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from erasekit.errors import ErasekitError, cli_message
from erasekit.runs import partial_dir

CHECKPOINT = "checkpoint.safetensors"  # methods.checkpoint.FILE (not imported: that module loads torch)


def owner(request: dict[str, Any]) -> int | None:
    """The process id of the run that wrote ``request``, when it still runs on this machine; else None."""
    pid, host = request.get("pid"), request.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or host != platform.node() or pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return None
    except (PermissionError, OSError):
        return pid  # it exists (owned by someone else) or cannot be asked: assume alive
    return pid


def _request(work: Path) -> dict[str, Any]:
    try:
        found = json.loads((work / "request.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def clear_stale_partial(out: Path, note: Callable[[str], Any] | None = None) -> bool:
    """Before a new run into ``out``: refuse an OUT.partial that can resume or whose run is alive; remove any other.

    Returns True when a stale folder was removed (``note`` is told, in one line).
    """
    work = partial_dir(out)
    if not work.exists():
        return False
    if not work.is_dir():
        raise ErasekitError(f"{work} is a file, in the place of the run's working folder; remove it or choose another --out")
    if (work / CHECKPOINT).exists():
        raise ErasekitError(f"an interrupted run is in {work}; continue it with `erasekit erase --resume {out}` or delete that folder")
    if (pid := owner(_request(work))) is not None:
        raise ErasekitError(f"a run (process {pid}) is working in {work} now; wait for it to finish, or choose another --out")
    try:
        shutil.rmtree(work)
    except OSError as exc:
        raise ErasekitError(f"cannot remove {work}, left by a run that stopped before its first checkpoint: {exc.strerror or exc}; delete it") from None
    if note is not None:
        note(f"removed {work}: a run stopped there before its first checkpoint, so there was nothing to resume")
    return True


def resumed_config(spec: Any, request: dict[str, Any], out: Path) -> Any:
    """The config of the interrupted run in OUT.partial, or one line saying why it cannot resume and what to do."""
    from erasekit.methods import make_config

    try:
        return make_config(spec, None, **request["config"])
    except (ErasekitError, TypeError) as exc:
        text = cli_message(exc) if isinstance(exc, ErasekitError) else str(exc)
        raise ErasekitError(f"the interrupted run in {partial_dir(out)} cannot resume: its recorded settings are refused ({text}); "
                            f"delete that folder and start again") from None
