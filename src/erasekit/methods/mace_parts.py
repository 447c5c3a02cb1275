"""MACE's parts that are not its loop: cross-attention probes, concept images with masks, and the closed-form fusion."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError, SettingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class AttentionProbe:
    """A cross-attention processor that computes the attention probabilities explicitly and keeps them for a loss.

    The output is the same attention as diffusers' own processors compute (softmax(QK^T / sqrt(d)) V per head);
    the probabilities (batch x heads, queries, tokens) and the layer's head count are appended to ``store``.
    """

    def __init__(self, store: list[tuple[torch.Tensor, int]]) -> None:
        self.store = store

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """One attention layer's forward, recording its probabilities."""
        if attn.residual_connection or attn.group_norm is not None or attn.spatial_norm is not None or hidden_states.ndim != 3:
            raise ErasekitError("mace's attention probe reads plain cross-attention layers (SD's transformer blocks); this model's differ")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0]) if attention_mask is not None else None
        probs = attn.get_attention_scores(query, key, mask)
        self.store.append((probs, attn.heads))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@contextmanager
def probed(unet: Any, store: list[tuple[torch.Tensor, int]]) -> Iterator[None]:
    """While open, every cross-attention layer (``attn2``) of the UNet records its probabilities into ``store``."""
    previous = dict(unet.attn_processors)
    probe = AttentionProbe(store)
    unet.set_attn_processor({name: probe if name.endswith("attn2.processor") else proc for name, proc in previous.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


def attention_loss(store: list[tuple[torch.Tensor, int]], tokens: list[int], mask: torch.Tensor) -> torch.Tensor:
    """MACE's attention loss: the squared attention of the concept's ``tokens`` inside the concept's ``mask``, summed over
    positions, averaged over layers, heads and images. ``store``: (probabilities, heads) per layer; ``mask``: B x H x W in [0, 1]."""
    total = torch.zeros((), device=mask.device)
    for probs, heads in store:
        side = int(round(probs.shape[1] ** 0.5))
        m = F.adaptive_avg_pool2d(mask[:, None], side).flatten(1)  # B x queries
        m = m.repeat_interleave(heads, dim=0)  # (B x heads) x queries
        on = probs[:, :, tokens] * m[:, :, None]
        total = total + on.pow(2).sum(dim=(1, 2)).mean()
    return total / max(len(store), 1)


def toy_images(concept: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` renders of a toy object in cycling colours, and its masks (where the render differs from the background)."""
    from erasekit.world.render import Scene, render
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    name = next((o for o in vocab.objects if concept.lower() in (s.lower() for s in vocab.object_synonyms(o))), None)
    if name is None:
        raise SettingError("images", f"mace renders masked images only of the toy world's objects, and {concept!r} is none; pass {{name}} DIR (images with <name>_mask.png masks)")
    background = np.asarray(vocab.raw["background"], dtype=np.int16)
    images = np.stack([render(Scene(name, vocab.colours[(seed + i) % len(vocab.colours)], "plain", False, seed * 1000 + i), vocab) for i in range(n)])
    masks = (np.abs(images.astype(np.int16) - background).max(axis=-1) > 12).astype(np.float32)
    return images, masks


def folder_images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images of a folder and their masks ``<stem>_mask.<ext>`` (white = the concept); every mismatch is a one-line error."""
    from PIL import Image

    if not folder.is_dir():
        raise SettingError("images", f"{{name}} {folder} is not a folder; pass a folder of images with <name>_mask.png masks")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))
    if not files:
        raise SettingError("images", f"{{name}} {folder} holds no image (png, jpg, webp, bmp); add images of the concept with <name>_mask.png masks")
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    for path in files:
        found = [m for m in (path.with_name(f"{path.stem}_mask{ext}") for ext in IMAGE_SUFFIXES) if m.exists()]
        if not found:
            raise SettingError("images", f"{{name}}: {path.name} has no mask {path.stem}_mask.png; add one (white where the concept is) or remove the image")
        try:
            image, mask = Image.open(path).convert("RGB"), Image.open(found[0]).convert("L")
        except OSError as exc:
            raise SettingError("images", f"{{name}}: {path.name} or its mask cannot be read as an image ({exc.__class__.__name__}); replace or remove it") from None
        if image.size != mask.size:
            raise SettingError("images", f"{{name}}: {path.name} is {image.size[0]}x{image.size[1]} but its mask {found[0].name} is {mask.size[0]}x{mask.size[1]}; make them the same size")
        if images and image.size != images[0].shape[1::-1]:
            raise SettingError("images", f"{{name}}: {path.name} is {image.size[0]}x{image.size[1]}, the first image {files[0].name} is {images[0].shape[1]}x{images[0].shape[0]}; give one size")
        images.append(np.asarray(image))
        masks.append((np.asarray(mask) > 127).astype(np.float32))
    return np.stack(images), np.stack(masks)


def fuse(base: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]], keys: list[torch.Tensor], keep: torch.Tensor, keep_scale: float, ridge: float = 1e-4) -> dict[str, torch.Tensor]:
    """MACE's closed-form fusion: per matrix, W* = argmin sum_i |W* E_i - W_i E_i|^2 + keep_scale |W* E_p - W E_p|^2 + ridge |W* - W|^2,

    ``targets[i]`` the matrices after concept i's own update, ``keys[i]`` its prompts' rows E_i, ``keep`` the retained rows E_p
    (rows R x d, float64). W* = (sum_i W_i G_i + keep_scale W G_p + ridge W)(sum_i G_i + keep_scale G_p + ridge I)^-1, G = E^T E.
    """
    keys, keep = [k.to("cpu", torch.float64) for k in keys], keep.to("cpu", torch.float64)
    d = keep.shape[1]
    grams = [k.T @ k for k in keys]
    g_keep = keep.T @ keep
    lhs = sum(grams, torch.zeros(d, d, dtype=torch.float64)) + keep_scale * g_keep + ridge * torch.eye(d, dtype=torch.float64)
    out = {}
    for name, w in base.items():  # on the CPU in float64, wherever the model's weights live
        w = w.to("cpu", torch.float64)
        rhs = sum((t[name].to(w) @ g for t, g in zip(targets, grams)), torch.zeros_like(w)) + keep_scale * w @ g_keep + ridge * w
        out[name] = torch.linalg.solve(lhs, rhs.T).T  # lhs is symmetric
    return out
