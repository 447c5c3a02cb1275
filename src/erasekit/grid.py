"""Labelled image grids (PNG) for prompts × seeds, with base and erased panels side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from erasekit.errors import ErasekitError


def _upscale(images: np.ndarray, min_side: int = 96) -> np.ndarray:
    """Nearest-neighbour upscale of small images so a 32x32 toy image stays readable."""
    factor = max(1, int(np.ceil(min_side / images.shape[1])))
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def prompt_grid(prompts: list[str], per_prompt: int, panels: list[tuple[str, np.ndarray]], pad: int = 4) -> Image.Image:
    """Rows = prompts; for each panel (title, images N x H x W x 3) a block of ``per_prompt`` columns."""
    panels = [(title, _upscale(imgs)) for title, imgs in panels]
    h, w = panels[0][1].shape[1:3]
    label_w, head_h = 260, 22
    block_w = per_prompt * (w + pad)
    width = label_w + len(panels) * (block_w + 3 * pad)
    height = head_h + len(prompts) * (h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for b, (title, imgs) in enumerate(panels):
        x0 = label_w + b * (block_w + 3 * pad)
        draw.text((x0, 4), title, fill="black")
        for i in range(len(prompts)):
            for j in range(per_prompt):
                tile = Image.fromarray(imgs[i * per_prompt + j])
                canvas.paste(tile, (x0 + j * (w + pad), head_h + i * (h + pad)))
    for i, prompt in enumerate(prompts):
        text = prompt if len(prompt) <= 40 else prompt[:37] + "..."
        draw.text((4, head_h + i * (h + pad) + h // 2 - 6), text, fill="black")
    return canvas


def label_tiles(grid: np.ndarray, rows: list[str], columns: list[str], pitch: tuple[int, int], offset: int,
                groups: list[str] | None = None) -> np.ndarray:
    """A tiled grid (uint8 H x W x 3) with its rows named on the left and its columns on top.

    ``pitch`` is (height, width) from one tile to the next, ``offset`` the margin before the first; ``groups``
    (optional) names blocks of equal width above the column names, e.g. the style of every colour in its block.
    """
    line = 14
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 8 + int(max(probe.textlength(r) for r in rows))
    top = line * (2 if groups else 1) + 4
    canvas = Image.new("RGB", (left + grid.shape[1], top + grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (left, top))
    draw = ImageDraw.Draw(canvas)
    ph, pw = pitch
    for i, name in enumerate(rows):
        draw.text((4, top + offset + i * ph + ph // 2 - line // 2), name, fill="black")
    for j, name in enumerate(columns):
        draw.text((left + offset + j * pw, top - line), _fit(probe, name, pw - 2), fill="black")
    if groups:
        span = len(columns) // len(groups) * pw
        for g, name in enumerate(groups):
            x0 = left + offset + g * span
            draw.text((x0, 2), _fit(probe, name, span - 4), fill="black")
            draw.line([(x0, line + 1), (x0 + span - offset - 2, line + 1)], fill="gray")
    return np.asarray(canvas)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """``text`` cut so that it fits ``width`` pixels (a column narrower than its name shows the name's start)."""
    while len(text) > 1 and draw.textlength(text) > width:
        text = text[:-1]
    return text


def save_png(image: Image.Image, out: Path) -> None:
    """Save a PNG through a temporary file and a rename."""
    from erasekit.atomic import save_png as _save

    if not out.parent.exists():
        raise ErasekitError(f"folder {out.parent} does not exist; create it first")
    _save(image, out)
