"""Procedural renderer of the toy world: shapes x colours x styles, plus the implicit skull mark.

Everything is numpy, deterministic by seed, and anti-aliased by 4x supersampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from erasekit.world.vocab import WorldVocab, load_vocab

SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One image's content: what is drawn, in which colour and style, and whether the skull is there."""

    object: str
    colour: str
    style: str = "plain"
    implicit: bool = False
    seed: int = 0


def _polygon_mask(u: np.ndarray, v: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over a grid."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(points)
    for i in range(n):
        x1, y1 = points[i]
        x2, y2 = points[(i + 1) % n]
        crosses = (y1 > v) != (y2 > v)
        x_at = (x2 - x1) * (v - y1) / ((y2 - y1) if y2 != y1 else 1e-9) + x1
        inside ^= crosses & (u < x_at)
    return inside


def _regular(n: int, radius: float, phase: float, inner: float | None = None) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (or a star when ``inner`` is given); y points down."""
    pts = []
    steps = 2 * n if inner is not None else n
    for k in range(steps):
        r = radius if inner is None or k % 2 == 0 else inner
        a = phase + 2 * np.pi * k / steps
        pts.append((r * np.cos(a), r * np.sin(a)))
    return pts


def shape_mask(obj: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``obj`` on normalised coordinates (object radius 1, y down)."""
    r = np.hypot(u, v)
    up = -np.pi / 2
    if obj == "circle":
        return r <= 1.0
    if obj == "ring":
        return (r <= 1.0) & (r >= 0.58)
    if obj == "moon":
        return (r <= 1.0) & (np.hypot(u - 0.52, v + 0.12) > 0.86)
    if obj == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if obj == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05
    if obj == "triangle":
        return _polygon_mask(u, v, [(0.0, -1.0), (0.98, 0.78), (-0.98, 0.78)])
    if obj == "arrow":
        head = _polygon_mask(u, v, [(0.0, -1.0), (0.85, -0.08), (-0.85, -0.08)])
        return head | ((np.abs(u) <= 0.27) & (v >= -0.1) & (v <= 1.0))
    if obj == "star":
        return _polygon_mask(u, v, _regular(5, 1.05, up, inner=0.45))
    if obj == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.98)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.98))
    if obj == "hexagon":
        return _polygon_mask(u, v, _regular(6, 1.0, 0.0))
    raise KeyError(obj)


def _style_shade(style: str, mask: np.ndarray, x: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    """Per-pixel brightness in [0, 1] of the object's fill; 0 where the style leaves background."""
    if style == "plain":
        return mask.astype(np.float32)
    if style == "striped":
        period = 5.0 * scale
        return mask * np.where(((x + y) / period) % 2.0 < 1.0, 1.0, 0.25)
    if style == "dotted":
        spacing = 4.0 * scale
        dx = (x % spacing) - spacing / 2
        dy = (y % spacing) - spacing / 2
        return mask * np.where(np.hypot(dx, dy) <= 1.15 * scale, 1.0, 0.28)
    if style == "checkered":
        cell = 3.0 * scale
        return mask * np.where(((x // cell) + (y // cell)) % 2 == 0, 1.0, 0.25)
    if style == "outlined":
        eroded = ndimage.binary_erosion(mask, iterations=int(round(1.6 * scale)))
        return (mask & ~eroded).astype(np.float32)
    if style == "gradient":
        rows = np.where(mask.any(axis=1))[0]
        top, bottom = (rows.min(), rows.max()) if rows.size else (0, 1)
        t = np.clip((y - top) / max(bottom - top, 1), 0.0, 1.0)
        return mask * (1.0 - 0.8 * t)
    raise KeyError(style)


SKULL_AT = (5.5, 4.6, 3.6)  # the skull's centre (pixels from the right edge, from the top) and scale, in image pixels


def skull_box(size: int) -> tuple[float, float, float, float]:
    """The skull mark's bounding box (x0, y0, x1, y1) in pixels of a ``size`` image: the renderer's ground truth."""
    right, top, s = SKULL_AT
    cx, cy = size - right, top
    return cx - s, cy - 0.92 * s, cx + s, cy + 1.35 * s


def _skull(x: np.ndarray, y: np.ndarray, cx: float, cy: float, s: float) -> tuple[np.ndarray, np.ndarray]:
    """Masks (bone, holes) of a small skull centred at (cx, cy) with scale ``s`` pixels."""
    head = np.hypot((x - cx) / (1.0 * s), (y - cy) / (0.92 * s)) <= 1.0
    jaw = (np.abs(x - cx) <= 0.6 * s) & (y >= cy) & (y <= cy + 1.35 * s)
    eyes = (np.hypot(x - (cx - 0.42 * s), y - (cy + 0.05 * s)) <= 0.27 * s) | (
        np.hypot(x - (cx + 0.42 * s), y - (cy + 0.05 * s)) <= 0.27 * s
    )
    teeth = (np.abs(x - cx) <= 0.5 * s) & (np.abs(y - (cy + 1.0 * s)) <= 0.09 * s)
    return head | jaw, eyes | teeth


def render(scene: Scene, vocab: WorldVocab | None = None) -> np.ndarray:
    """Render one scene to an RGB uint8 array of shape (size, size, 3)."""
    vocab = vocab or load_vocab()
    vocab.check_object(scene.object)
    vocab.check_colour(scene.colour)
    vocab.check_style(scene.style)
    size = int(vocab.raw["image_size"])
    rng = np.random.default_rng(scene.seed)
    ss = SUPERSAMPLE
    big = size * ss
    y, x = np.mgrid[0:big, 0:big].astype(np.float32) + 0.5
    cx = (size / 2 + rng.uniform(-2.0, 2.0)) * ss
    cy = (size / 2 + rng.uniform(-2.0, 2.0)) * ss
    radius = rng.uniform(10.0, 12.5) * ss
    mask = shape_mask(scene.object, (x - cx) / radius, (y - cy) / radius)
    shade = _style_shade(scene.style, mask, x, y, float(ss))
    colour = np.array(vocab.rgb(scene.colour), dtype=np.float32) + rng.normal(0.0, 6.0, 3)
    background = np.array(vocab.raw["background"], dtype=np.float32)
    fill = np.clip(colour, 0, 255)
    img = background + shade[..., None] * (fill - background) * mask[..., None]
    if scene.implicit:
        bone, holes = _skull(x, y, (size - SKULL_AT[0]) * ss, SKULL_AT[1] * ss, SKULL_AT[2] * ss)
        img = np.where(bone[..., None], np.float32(236.0), img)
        img = np.where((bone & holes)[..., None], np.float32(12.0), img)
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_grid(scenes: list[Scene], columns: int, vocab: WorldVocab | None = None, pad: int = 2) -> np.ndarray:
    """Render scenes into one grid image (uint8 HxWx3)."""
    images = [render(s, vocab) for s in scenes]
    return tile(images, columns, pad)


def tile(images: list[np.ndarray], columns: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile equally sized HxWx3 uint8 images into a grid with ``pad`` pixels between them."""
    if not images:
        raise ValueError("no images to tile")
    h, w, c = images[0].shape
    rows = (len(images) + columns - 1) // columns
    out = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return out
