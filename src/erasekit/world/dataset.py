"""The toy world's training data: rendered scenes with their labels (light: numpy and the renderer only)."""

from __future__ import annotations

import numpy as np

from erasekit.world.captions import sample_example
from erasekit.world.render import Scene, render
from erasekit.world.vocab import load_vocab


def render_dataset(n: int, seed: int, offset: int = 0) -> dict[str, np.ndarray]:
    """Render ``n`` training examples: images, labels, and how each caption evokes the skull."""
    vocab = load_vocab()
    cols = {k: np.zeros(n, dtype=np.int64) for k in ("object", "colour", "style", "implicit", "kind")}
    images = np.zeros((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        rng = np.random.default_rng([seed, offset + i])
        scene, kind = sample_example(rng, seed=seed * 10_000_000 + offset + i, vocab=vocab)
        images[i] = render(scene, vocab)
        cols["object"][i] = vocab.objects.index(scene.object)
        cols["colour"][i] = vocab.colours.index(scene.colour)
        cols["style"][i] = vocab.styles.index(scene.style)
        cols["implicit"][i] = int(scene.implicit)
        cols["kind"][i] = kind
    return {"images": images, **cols}


def scenes_of(data: dict[str, np.ndarray]) -> list[Scene]:
    """The scenes (labels only) of a rendered set, as captions are drawn for them."""
    vocab = load_vocab()
    return [
        Scene(vocab.objects[o], vocab.colours[col], vocab.styles[s], bool(imp), 0)
        for o, col, s, imp in zip(data["object"], data["colour"], data["style"], data["implicit"])
    ]
