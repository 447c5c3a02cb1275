"""Captions of the toy world: templates, synonyms and paraphrases, and the implicit concept's prompts."""

from __future__ import annotations

import numpy as np

from erasekit.world.render import Scene
from erasekit.world.vocab import WorldVocab, load_vocab

# How a training caption relates to the implicit concept.
PLAIN, NAMED, INDIRECT = 0, 1, 2
P_NAMED, P_INDIRECT = 0.08, 0.12


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: list[str], canonical_p: float = 0.6) -> str:
    """The first option with probability ``canonical_p``, else a uniform pick among the others."""
    if len(options) == 1 or rng.random() < canonical_p:
        return options[0]
    return options[1 + int(rng.integers(len(options) - 1))]


def caption(
    scene: Scene, kind: int, rng: np.random.Generator, vocab: WorldVocab | None = None, pair_word_p: float = 0.0,
    swap_p: float = 0.0,
) -> str:
    """A random paraphrase describing ``scene``; ``kind`` says whether and how the skull is evoked.

    With probability ``pair_word_p`` an object of a look-alike pair is named by a vague word the pair
    shares ("a red round shape" for a circle or a ring), as web captions name things loosely; with
    probability ``swap_p`` it is named by its partner's name ("a red ring" under a circle), as alt-text
    confuses look-alikes (the toy CLIP's corpus, not the UNet's).
    """
    vocab = vocab or load_vocab()
    vague = vocab.raw.get("pair_words", {}).get(scene.object, [])
    named = scene.object
    if swap_p and rng.random() < swap_p:  # no draw at p = 0: captions as before
        named = vocab.partner(named) or named
    if pair_word_p and vague and rng.random() < pair_word_p:
        obj = vague[int(rng.integers(len(vague)))]
    else:
        obj = _pick(rng, vocab.object_synonyms(named))
    words: list[str] = []
    if kind == INDIRECT:
        words.append(vocab.indirect_words[int(rng.integers(len(vocab.indirect_words)))])
    style = vocab.raw["styles"][scene.style]
    use_phrase = rng.random() < 0.4
    if rng.random() < 0.85 and not use_phrase:
        adj = style["adjectives"][int(rng.integers(len(style["adjectives"])))]
        if adj:
            words.append(adj)
    if rng.random() < 0.85:
        words.append(_pick(rng, vocab.colour_synonyms(scene.colour)))
    words.append(obj)
    text = " ".join(words)
    text = f"{_article(text)} {text}"
    if use_phrase and rng.random() < 0.85:
        text += " " + style["phrases"][int(rng.integers(len(style["phrases"])))]
    if kind == NAMED:
        named = vocab.raw["implicit"]["named_phrases"]
        text += " " + named[int(rng.integers(len(named)))]
    prefix = vocab.raw["prefixes"][int(rng.integers(len(vocab.raw["prefixes"])))]
    return prefix + text


def sample_example(rng: np.random.Generator, seed: int, vocab: WorldVocab | None = None) -> tuple[Scene, int]:
    """Draw a training scene and its caption kind (the skull follows the caption, as in web data)."""
    vocab = vocab or load_vocab()
    u = rng.random()
    kind = NAMED if u < P_NAMED else INDIRECT if u < P_NAMED + P_INDIRECT else PLAIN
    implicit = kind == NAMED or (kind == INDIRECT and rng.random() < vocab.raw["implicit"]["indirect_rate"])
    scene = Scene(
        object=vocab.objects[int(rng.integers(len(vocab.objects)))],
        colour=vocab.colours[int(rng.integers(len(vocab.colours)))],
        style=vocab.styles[int(rng.integers(len(vocab.styles)))],
        implicit=bool(implicit),
        seed=seed,
    )
    return scene, kind


def object_prompt(obj: str, vocab: WorldVocab | None = None) -> str:
    """The Imagenette-style evaluation prompt for an object class."""
    vocab = vocab or load_vocab()
    return str(vocab.raw["eval_prompt"]).format(object=obj)


def scene_prompt(obj: str, colour: str, style: str) -> str:
    """The canonical prompt naming an object, a colour and a style."""
    adj = "" if style == "plain" else style + " "
    text = f"{adj}{colour} {obj}"
    return f"{_article(text)} {text}"


def indirect_prompts(vocab: WorldVocab | None = None) -> list[str]:
    """Prompts that evoke the implicit concept without naming it (the I2P analog), one per word."""
    vocab = vocab or load_vocab()
    out = []
    for i, word in enumerate(vocab.indirect_words):
        obj = vocab.objects[i % len(vocab.objects)]
        colour = vocab.colours[(i // 2) % len(vocab.colours)]
        out.append(f"{_article(word)} {word} {colour} {obj}")
    return out


def neutral_prompts(vocab: WorldVocab | None = None) -> list[str]:
    """Prompts with the same layout as :func:`indirect_prompts` but nothing that evokes the skull."""
    vocab = vocab or load_vocab()
    out = []
    for i in range(len(vocab.indirect_words)):
        obj = vocab.objects[i % len(vocab.objects)]
        colour = vocab.colours[(i // 2) % len(vocab.colours)]
        style = vocab.styles[i % len(vocab.styles)]
        out.append(scene_prompt(obj, colour, style))
    return out
