"""All-or-nothing file writes: a temp file in the same folder, then a rename (never a half-written output).

A write that fails (disk full, no permission, read-only folder) removes its temp file, leaves the previous
file byte for byte as it was, and raises :class:`OutputError`: one line that names the file and says what to do.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from erasekit.errors import ErasekitError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputError(ErasekitError, OSError):
    """A file could not be written; an ErasekitError (one line for the CLI) and still an OSError for callers that catch those."""


def output_error(exc: OSError, what: str) -> OutputError:
    """``exc`` from writing ``what`` as one actionable line (the errno is kept)."""
    if isinstance(exc, OutputError):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in _FULL:
        hint = "free some disk space or choose another folder"
    elif exc.errno in _DENIED:
        hint = "choose a folder you can write to"
    else:
        hint = "check the folder and try again"
    error = OutputError(f"cannot write {what}: {reason}; {hint} (the previous file, if any, is unchanged)")
    error.errno = exc.errno
    return error


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temp file and a rename (safe across processes)."""
    atomic_write_files({Path(path): data})


def atomic_write_files(files: Mapping[Path, bytes]) -> None:
    """Write several files that belong together (a JSON and its grid): every temp file first, then the renames.

    A failure while writing (disk full, no permission) changes none of them. The renames need no space, so
    they do not fail that way.
    """
    temps: dict[Path, Path] = {}
    current = Path(".")
    try:
        for path, data in files.items():
            current = Path(path)
            temps[current] = tmp = _temp_name(current)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for path, tmp in temps.items():
            current = path
            os.replace(tmp, path)
    except BaseException as exc:
        for tmp in temps.values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the folder itself is unwritable: no temp file was made there
        if isinstance(exc, OSError):
            raise output_error(exc, str(current)) from None
        raise


@contextmanager
def atomic_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``folder`` to fill; on success it replaces ``folder``, on failure it is removed.

    The old folder is moved aside before the new one is renamed in and deleted after, so a kill leaves the old
    folder (under ``.NAME.old``) or the new one, never a half-written one under ``folder``'s name.
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier write
    moved = False
    try:
        tmp.mkdir(parents=True)
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
            moved = True
        os.replace(tmp, folder)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not folder.exists():
            os.replace(old, folder)  # the new one could not be renamed in: put the old one back
        if isinstance(exc, OSError):
            raise output_error(exc, str(folder)) from None
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Text flavour of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG (for :func:`atomic_write_files`)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image, out: Path, what: str = "") -> None:
    """Save a PNG atomically; an OS error becomes a one-line OutputError naming the file (or ``what``)."""
    try:
        atomic_write_bytes(out, png_bytes(image))
    except OutputError as exc:
        if what:
            error = OutputError(str(exc).replace(f"cannot write {out}:", f"cannot write {what}:", 1))
            error.errno = exc.errno
            raise error from None
        raise
