"""The toy world's vocabulary, read from the one data file every suite shares (assets/world.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from erasekit.errors import ErasekitError


@dataclass(frozen=True)
class WorldVocab:
    """Classes, colours, styles and the implicit concept of the toy world."""

    raw: dict[str, Any]

    @property
    def objects(self) -> list[str]:
        """Object class names, in label order."""
        return list(self.raw["objects"])

    @property
    def colours(self) -> list[str]:
        """Colour names, in label order."""
        return list(self.raw["colours"])

    @property
    def styles(self) -> list[str]:
        """Style names (``plain`` first), in label order."""
        return list(self.raw["styles"])

    @property
    def erasable_styles(self) -> list[str]:
        """The styles that play the role of artists (every style but ``plain``)."""
        return list(self.raw["erasable_styles"])

    @property
    def implicit_name(self) -> str:
        """The implicit concept's name (the analog of nudity)."""
        return str(self.raw["implicit"]["name"])

    @property
    def indirect_words(self) -> list[str]:
        """Words that evoke the implicit concept without naming it (the analog of I2P)."""
        return list(self.raw["implicit"]["indirect_words"])

    def neighbours(self, obj: str) -> list[str]:
        """Objects designed to look like ``obj``."""
        self.check_object(obj)
        return list(self.raw["objects"][obj]["neighbours"])

    def lookalike_pairs(self) -> list[tuple[str, str]]:
        """The designed look-alike pairs (erase the first, its partner should suffer most): the Fig. 2 bar."""
        return [(a, b) for a, b in self.raw["lookalike_pairs"]]

    def partner(self, obj: str) -> str | None:
        """The other object of ``obj``'s designed look-alike pair, None if it has none."""
        return next((b if a == obj else a for a, b in self.lookalike_pairs() if obj in (a, b)), None)

    def object_synonyms(self, obj: str) -> list[str]:
        """Words that name ``obj`` (the first is the class name)."""
        self.check_object(obj)
        return list(self.raw["objects"][obj]["synonyms"])

    def colour_synonyms(self, colour: str) -> list[str]:
        """Words that name ``colour``."""
        return list(self.raw["colours"][colour]["synonyms"])

    def rgb(self, colour: str) -> tuple[int, int, int]:
        """The colour's base RGB value."""
        self.check_colour(colour)
        r, g, b = self.raw["colours"][colour]["rgb"]
        return int(r), int(g), int(b)

    def concept_words(self) -> list[str]:
        """Every word or phrase of the world: the toy concept space for adversarial search."""
        words: list[str] = []
        for obj in self.objects:
            words += self.object_synonyms(obj)
        for colour in self.colours:
            words += self.colour_synonyms(colour)
        for style in self.styles:
            words += [a for a in self.raw["styles"][style]["adjectives"] if a]
        words += [self.implicit_name] + self.indirect_words
        return list(dict.fromkeys(words))

    def lexicon(self) -> tuple[frozenset[str], frozenset[str]]:
        """The words of the world's captions: those that name something (objects, colours, styles, the skull and
        the words that evoke it), and every word (those plus articles, prompt prefixes and style phrases)."""
        naming = {w for text in [*self.concept_words(), *self.styles] for w in words_of(text)}
        glue = [*(p for s in self.styles for p in self.raw["styles"][s]["phrases"]), *self.raw["implicit"]["named_phrases"],
                *self.raw["prefixes"], str(self.raw["eval_prompt"]).replace("{object}", ""), "a an the"]
        return frozenset(naming), frozenset(naming | {w for text in glue for w in words_of(text)})

    def synonym_groups(self) -> dict[str, str]:
        """Every name of an object, colour or style (lower case, one space) -> what it names, e.g. 'disc' -> 'circle'."""
        groups = {" ".join(words_of(s)): obj for obj in self.objects for s in self.object_synonyms(obj)}
        groups.update({" ".join(words_of(s)): colour for colour in self.colours for s in self.colour_synonyms(colour)})
        for style in self.styles:
            names = [style, *self.raw["styles"][style]["adjectives"], *self.raw["styles"][style]["phrases"]]
            groups.update({" ".join(words_of(n)): style for n in names if n})
        return groups

    def check_object(self, obj: str) -> None:
        """Raise a one-line error naming the known objects if ``obj`` is unknown."""
        if obj not in self.raw["objects"]:
            raise ErasekitError(f"unknown object {obj!r}; choose one of: {', '.join(self.objects)}")

    def check_colour(self, colour: str) -> None:
        """Raise a one-line error naming the known colours if ``colour`` is unknown."""
        if colour not in self.raw["colours"]:
            raise ErasekitError(f"unknown colour {colour!r}; choose one of: {', '.join(self.colours)}")

    def check_style(self, style: str) -> None:
        """Raise a one-line error naming the known styles if ``style`` is unknown."""
        if style not in self.raw["styles"]:
            raise ErasekitError(f"unknown style {style!r}; choose one of: {', '.join(self.styles)}")


def words_of(text: str) -> list[str]:
    """The words of a caption or concept as the vocabulary compares them: lower case, split at spaces and hyphens."""
    return text.lower().replace("-", " ").split()


@cache
def load_vocab() -> WorldVocab:
    """Load the shipped world vocabulary."""
    text = resources.files("erasekit.world").joinpath("assets/world.json").read_text("utf-8")
    return WorldVocab(json.loads(text))
