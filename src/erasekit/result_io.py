"""Where a delta is saved and read: a ``.safetensors`` file, or a run folder that holds ``delta.safetensors``.

The same two forms are accepted everywhere a delta is named (``ErasureResult.save``, ``erasekit.load``,
``erasekit.evaluate``, the CLI's TARGET and ``--delta``), so a folder from Python and one from the CLI are interchangeable.
"""

from __future__ import annotations

from pathlib import Path

from erasekit.checks import usable_path
from erasekit.errors import ErasekitError

DELTA = "delta.safetensors"
SUFFIX = ".safetensors"


def delta_file(path: Path) -> Path:
    """The delta file ``path`` names: itself, or ``path/delta.safetensors`` for a folder (which must hold one)."""
    path = usable_path(path, "delta path")
    if path.is_dir():
        if not (path / DELTA).is_file():
            raise ErasekitError(f"{path} is a folder without {DELTA}; pass a run folder from `erasekit erase` (or result.save) or a delta file")
        return path / DELTA
    return path


def save_target(path: Path, overwrite: bool = False) -> tuple[Path, Path | None]:
    """The file :meth:`ErasureResult.save` writes for ``path``, and the folder it created for it (None if none).

    An existing folder, or a name without a suffix (a new folder, created here; its parent must exist), gets
    ``delta.safetensors`` inside; a name ending in ``.safetensors`` is the file; any other name is refused, so a
    delta never lands in a file without its extension.
    """
    path = usable_path(path, "output path")
    if path.is_dir():
        folder, made = path, None
    elif path.suffix.lower() == SUFFIX:
        folder, made = path.parent, None
    elif path.suffix:
        raise ErasekitError(f"{path} ends in {path.suffix!r}; a delta is saved as safetensors: name a file ending in {SUFFIX}, or a folder")
    elif path.exists():
        raise ErasekitError(f"{path} is a file, not a folder; name a folder (the delta goes inside as {DELTA}) or a file ending in {SUFFIX}")
    else:
        folder, made = path, path
    if not folder.parent.is_dir() if made is not None else not folder.is_dir():
        missing = folder.parent if made is not None else folder
        raise ErasekitError(f"folder {missing} does not exist; create it first")
    target = folder / DELTA if path.is_dir() or made is not None else path
    if target.is_dir():
        raise ErasekitError(f"{target} is a folder; name a file ending in {SUFFIX}, or a folder to hold {DELTA}")
    if target.exists() and not overwrite:
        raise ErasekitError(f"{target} already exists; choose another path, remove it, or pass overwrite=True")
    if made is not None:
        try:
            made.mkdir()
        except OSError as exc:
            raise ErasekitError(f"cannot create {made}: {exc.strerror or exc}; choose a folder you can write to") from None
    return target, made
