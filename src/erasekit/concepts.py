"""Concept spaces, full text-encoder embeddings, and EAP's candidate selection (DESIGN.md §3, step 1)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasekit.errors import ErasekitError
from erasekit.families import Cond, family_of
from erasekit.families.base import Pipeline

_WORD = re.compile(r"^[A-Za-z][A-Za-z \-]*$")


@dataclass(frozen=True)
class ConceptSpace:
    """A named list of concepts (words or short phrases) that the adversarial search chooses from."""

    name: str
    words: tuple[str, ...]


def concept_space(source: str, pipe: Pipeline | None = None) -> ConceptSpace:
    """Resolve ``toy`` (the world's vocabulary), ``clip`` (the tokenizer's whole words) or a word-list file."""
    if source == "toy":
        from erasekit.world.vocab import load_vocab

        return ConceptSpace("toy", tuple(load_vocab().concept_words()))
    if source == "clip":
        if pipe is None:
            raise ErasekitError("the 'clip' concept space needs a pipeline (its tokenizer)")
        words = [tok[: -len("</w>")] for tok in pipe.tokenizer.get_vocab() if tok.endswith("</w>")]
        words = sorted(w for w in words if len(w) > 2 and w.isalpha() and w.isascii())
        return ConceptSpace("clip", tuple(words))
    path = Path(source)
    if not path.is_file():
        raise ErasekitError(f"concept space {source!r} is neither 'toy', 'clip' nor a word-list file; pass a text file with one concept per line")
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    words = list(dict.fromkeys(w for w in words if w and not w.startswith("#")))
    if not words:
        raise ErasekitError(f"{path} holds no concepts; write one concept per line")
    return ConceptSpace(path.stem, tuple(words))


def check_prompt(pipe: Pipeline, text: str, what: str = "concept") -> str:
    """Strip ``text`` and refuse empty prompts and prompts longer than the encoder's 77 tokens."""
    return check_length(pipe.tokenizer, text, what)


def check_length(tokenizer: Any, text: str, what: str = "concept") -> str:
    """Strip ``text`` and refuse it when empty or longer than the tokenizer's ``model_max_length`` (77 for CLIP)."""
    text = (text or "").strip()
    if not text:
        raise ErasekitError(f"empty {what}; give a word or phrase such as 'circle'")
    limit = tokenizer.model_max_length
    n = len(tokenizer(text, truncation=False).input_ids)
    if n > limit:
        raise ErasekitError(f"{what} {text[:40]!r}... is {n} tokens long; the text encoder takes at most {limit} (with start/end tokens): shorten it")
    return text


# how a message names the inputs: the CLI's flags, or erasekit.erase's keyword arguments
_CLI_NAMES = {"concept": "--concept", "preserve": "--preserve", "list": "--preserve", "force": "--allow-unknown"}
_PYTHON_NAMES = {"concept": "concept", "preserve": "preserve concept", "list": "preserve=", "force": "allow_unknown=True"}


def check_targets(targets: Sequence[str], preserve: Sequence[str] = (), toy: bool = False, allow_unknown: bool = False, cli: bool = False) -> None:
    """Refuse concepts that cannot be what the user meant, before anything loads or trains.

    On any model: a comma in a concept (two concepts in one?) unless ``allow_unknown``, a concept given twice, and
    a concept both erased and preserved. On the toy world (``toy``): a concept with a word its captions never use (``giraffe``,
    ``círculo``) unless ``allow_unknown``, and erasing one name of a thing while preserving another ('circle', 'disc').
    ``cli`` names the flags in messages, else the keyword arguments of :func:`erasekit.erase`.
    """
    names = _CLI_NAMES if cli else _PYTHON_NAMES
    for key, texts in (("concept", targets), ("preserve", preserve)):
        for text in texts:
            if not allow_unknown and "," in text:
                raise ErasekitError(f"{names[key]} {text!r} holds a comma: did you mean separate concepts? {_split_hint(text, key, cli)} "
                                    f"(or pass {names['force']} to keep it as one concept)")
            if toy and not allow_unknown:
                _check_toy_word(text, names[key], names["force"])
    group: dict[str, str] = {}
    if toy:
        from erasekit.world.vocab import load_vocab

        group = load_vocab().synonym_groups()
    seen: dict[str, str] = {}
    for key, texts in (("concept", targets), ("preserve", preserve)):
        seen.clear()
        for text in texts:
            if (first := seen.get(_norm(text))) is not None:
                raise ErasekitError(f"{names[key]} {text!r} is given twice (as {first!r} too); give each concept once")
            seen[_norm(text)] = text
    erased = {group.get(_norm(t), _norm(t)): t for t in targets}
    for kept in preserve:
        if (hit := erased.get(group.get(_norm(kept), _norm(kept)))) is not None:
            same = "is" if _norm(hit) == _norm(kept) else f"names the same toy {_kind_of(group[_norm(kept)])} as"
            raise ErasekitError(f"{names['preserve']} {kept!r} {same} the erased {hit!r}: it cannot be both erased and preserved; "
                                f"drop it from {names['list']}")


def _norm(text: str) -> str:
    from erasekit.world.vocab import words_of

    return " ".join(words_of(text))


def _split_hint(text: str, key: str, cli: bool) -> str:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        return "give a word or phrase such as 'circle'"
    if cli:
        return "pass " + " ".join(f"--{key} {shlex.quote(p)}" for p in parts)
    return f"pass {'concepts' if key == 'concept' else 'preserve'}={parts!r}"


def _kind_of(name: str) -> str:
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    return "object" if name in vocab.objects else "colour" if name in vocab.colours else "style"


def _check_toy_word(text: str, what: str, force: str) -> None:
    """Refuse a concept the toy world's captions never name: an unknown word, or none that names anything."""
    from erasekit.world.vocab import load_vocab, words_of

    vocab = load_vocab()
    naming, known = vocab.lexicon()
    words = words_of(text)
    unknown = [w for w in words if w not in known]
    if unknown or not any(w in naming for w in words):
        why = f"the word {unknown[0]!r} is not in its vocabulary" if unknown else "none of its words names an object, colour or style"
        raise ErasekitError(
            f"{what} {text!r} is not something the toy world knows ({why}); it knows the objects {', '.join(vocab.objects)}, "
            f"the colours {', '.join(vocab.colours)}, the styles {', '.join(vocab.erasable_styles)} and {vocab.implicit_name!r}, "
            f"with their synonyms (e.g. 'disc' for circle); pass {force} to use it anyway"
        )


@torch.no_grad()
def encode_cond(pipe: Any, prompts: list[str], batch_size: int = 64) -> Cond:
    """The conditioning of ``prompts`` as the pipeline's denoiser sees it (any family), batched."""
    family = family_of(pipe)
    parts = [family.encode(pipe, prompts[s : s + batch_size]) for s in range(0, len(prompts), batch_size)]
    if not parts:
        raise ErasekitError("no prompts to encode")
    return Cond.cat(parts)


@torch.no_grad()
def encode(pipe: Pipeline, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Full text-encoder outputs (N x 77 x d last hidden states), the conditioning an SD 1.x/2.x UNet sees."""
    return encode_cond(pipe, prompts, batch_size).parts["hidden"]


@torch.no_grad()
def distances(pipe: Any, target: torch.Tensor | Cond, words: list[str], batch_size: int = 64) -> torch.Tensor:
    """L2 distance of every word's whole conditioning to ``target``'s (streamed: never holds the whole space)."""
    flat_target = (target.flat()[0] if isinstance(target, Cond) else target.flatten()).double()
    out = []
    for start in range(0, len(words), batch_size):
        emb = encode_cond(pipe, words[start : start + batch_size]).flat().double()
        out.append(torch.linalg.vector_norm(emb - flat_target[None], dim=1).cpu())
    return torch.cat(out)


def select_candidates(dist: torch.Tensor, words: list[str], k: int, n_centres: int, exclude: set[str], n_init: int = 1) -> list[str]:
    """EAP's candidates: the K nearest concepts by L2 over full text embeddings, thinned by KMeans.

    KMeans runs on the 1-D distances to the target (as the reference does); per centre, the word whose
    distance is nearest the centre is kept. Words with non-letters and excluded words are dropped first
    (the reference keeps the target itself among its candidates; we do not). The reference calls
    ``KMeans(random_state=0)``, which since scikit-learn 1.4 runs one k-means++ initialisation
    (``n_init='auto'``; 10 before 1.4): ``n_init`` = 1 and random_state 0 match it as run today.
    Returned in the order of their centres (nearest first).
    """
    from sklearn.cluster import KMeans

    keep = [i for i, w in enumerate(words) if _WORD.match(w) and not _excluded(w, exclude)]
    if not keep:
        raise ErasekitError("the concept space has no usable concepts once the targets are excluded")
    if k > len(keep):
        raise ErasekitError(f"K={k} nearest concepts asked for, but the concept space has only {len(keep)} usable concepts; lower --k or use a larger space")
    if n_centres > k:
        raise ErasekitError(f"{n_centres} KMeans centres cannot be chosen from K={k} candidates; lower --n-centres or raise --k")
    kept = dist[keep]
    order = torch.argsort(kept, stable=True)[:k]
    near = kept[order].numpy().reshape(-1, 1)
    km = KMeans(n_clusters=n_centres, n_init=n_init, random_state=0).fit(near)
    chosen: list[int] = []
    for centre in np.sort(km.cluster_centers_[:, 0]):
        j = int(np.argmin(np.abs(near[:, 0] - centre)))
        if j not in chosen:
            chosen.append(j)
    return [words[keep[int(order[j])]] for j in chosen]


def _excluded(word: str, exclude: set[str]) -> bool:
    """A word is excluded when it is, or contains as a word, one of the excluded concepts."""
    lower = word.lower()
    parts = set(re.split(r"[ \-]+", lower))
    return lower in exclude or bool(parts & exclude)
