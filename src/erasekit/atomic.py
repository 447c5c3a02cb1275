"""All-or-nothing file writes: a temp file in the same folder, then a rename (never a half-written output)."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from PIL import Image

from erasekit.errors import ErasekitError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temp file and a rename (safe across processes)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text flavour of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_png(image: Image.Image, out: Path, what: str = "") -> None:
    """Save a PNG atomically; an OS error becomes a one-line ErasekitError naming the file."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as exc:
        raise ErasekitError(f"cannot write {what or out}: {exc.strerror or exc}") from None
