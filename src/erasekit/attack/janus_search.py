"""Discrete adversarial-token search against an erased Janus (the autoregressive analog of :mod:`erasekit.attack.search`).

On a diffusion model the attack asks the erased model to denoise the base model's image of the concept; on Janus
the base model's image *is* a sequence of image tokens, so the attack asks the erased model to give those tokens
back their likelihood:

    min_{tokens}  mean_i  CE( erased_logits_i(format(tokens + prompt), image[:i]), image[i] )

the teacher-forced cross-entropy of the generation head (conditional branch only, no CFG in the loss) over the
base model's image tokens for the prompt, with the N adversarial words before the prompt in Janus's prompt format
(``<|User|>: w1 .. wN prompt\\n\\n<|Assistant|>:<begin_of_image>``).

The token choice is relaxed PEZ-style as on diffusion: every adversarial slot holds a free vector in the language
model's text input-embedding space; each step projects it to the nearest candidate token (cosine), runs the model
on the *projected* embeddings (exactly the tokens' own rows), and applies the gradient to the free vector
(straight-through). The prompt is re-tokenised from its text every step and the slots are checked to hold the
projected tokens, so every recorded loss is the loss of a real, discrete prompt; the best one seen is kept.
Start tokens come from each prompt's seed alone, so the search is deterministic for a seed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from erasekit.attack.search import Candidates, SearchProgress, SearchResult, candidate_tokens, pez_search
from erasekit.autoregressive.janus import PROMPT_FORMAT, Janus, Prompts, encode_prompts, image_logits, image_token_count
from erasekit.errors import ErasekitError

_ALPHA = re.compile(r"^[a-z]{2,}$")
_PROBE = "x"  # a one-token prompt after the probed words (whole words only are searched, so any such word will do)


def janus_candidates(janus: Janus, extra_words: Sequence[str] = (), exclude_words: Sequence[str] = (), whole_vocab: bool = True) -> Candidates:
    """Whole-word tokens of a Janus tokenizer plus ``extra_words``, minus the words of ``exclude_words``, each kept only when,
    written twice before a prompt in Janus's prompt format, it tokenizes to its own single token both times.

    A CLIP-BPE tokenizer (``</w>`` word ends, the tiny Janus's) goes through :func:`candidate_tokens`; another (a
    byte-level BPE, Janus-Pro's, or a SentencePiece one) offers its word-initial tokens that decode back to their word.
    """
    tokenizer = janus.tokenizer
    vocab = tokenizer.get_vocab()
    if any(tok.endswith("</w>") for tok in vocab):
        found = candidate_tokens(tokenizer, extra_words, exclude_words, whole_vocab)
        pool: dict[str, int | None] = {w: int(i) for w, i in zip(found.words, found.ids)}
    else:
        excluded = {p for w in exclude_words for p in re.split(r"[^a-z]+", w.lower()) if p}
        words = set(re.split(r"[^a-z]+", " ".join(extra_words).lower()))
        if whole_vocab:  # word-initial tokens: byte-level BPE marks the space before a word with 'Ġ', SentencePiece with '▁'
            words |= {tok[1:] for tok in vocab if tok[:1] in ("\u0120", "\u2581")}
        pool = {w: None for w in sorted(words) if _ALPHA.match(w) and w not in excluded}
    kept = _single_in_context(janus, pool)
    if not kept:
        raise ErasekitError("no candidate token is left for the adversarial prompt on this Janus tokenizer; use --vocabulary clip")
    return Candidates(torch.tensor([i for _, i in kept], dtype=torch.long), tuple(w for w, _ in kept))


def _single_in_context(janus: Janus, pool: dict[str, int | None]) -> list[tuple[str, int]]:
    """The (word, id) pairs of ``pool`` whose word, written twice before a prompt, is one token (its id, when given) both times."""
    if not pool:
        return []
    start, length = prefix_length(janus), len(_ids(janus, [_PROBE])[0])
    kept = []
    words = list(pool)
    for lo in range(0, len(words), 512):
        chunk = words[lo : lo + 512]
        for w, ids in zip(chunk, _ids(janus, [f"{w} {w} {_PROBE}" for w in chunk])):
            first, second = ids[start : start + 2] if len(ids) == length + 2 else (-1, -2)
            known = pool[w]  # a CLIP word's own token id; another tokenizer's word must decode back to itself
            if first == second and (first == known if known is not None else janus.tokenizer.decode([first]).strip() == w):
                kept.append((w, int(first)))
    return kept


def _ids(janus: Janus, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt in Janus's generation format, unpadded."""
    boi = janus.tokenizer.convert_ids_to_tokens(janus.boi_id)
    return [list(janus.tokenizer(PROMPT_FORMAT.format(prompt=p) + boi).input_ids) for p in prompts]


def prefix_length(janus: Janus) -> int:
    """Tokens before the prompt in Janus's format (BOS and the user role): the first adversarial slot, counted from the first real token.

    The space before the prompt is left out: CLIP's BPE drops it, byte-level and SentencePiece BPE join it to the first word.
    """
    return len(janus.tokenizer(PROMPT_FORMAT.split("{prompt}")[0].rstrip()).input_ids)


def check_janus_lengths(janus: Janus, prompts: Sequence[str], tokens: int) -> None:
    """Refuse a prompt that, with ``tokens`` adversarial words and an image's tokens after it, is longer than the language model takes."""
    limit = int(janus.model.config.text_config.max_position_embeddings)
    image = image_token_count(janus.model)
    for p, ids in zip(prompts, _ids(janus, prompts)):
        n = len(ids) + tokens + image
        if n > limit:
            raise ErasekitError(f"prompt {p[:40]!r} plus {tokens} adversarial tokens and the image's {image} tokens is {n} positions; "
                                f"the language model takes {limit}: shorten it or lower --tokens")


def token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-prompt mean cross-entropy (B values) of image-token logits (B x N x codebook) for the image tokens (B x N)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), tokens.to(logits.device).flatten(), reduction="none")
    return ce.view(tokens.shape).mean(1)


def plain_losses(janus: Janus, prompts: Sequence[str], image_tokens: torch.Tensor) -> torch.Tensor:
    """Per-prompt loss of plain-text ``prompts`` (no slots): :func:`token_loss` of :func:`image_logits` (checks a reported prompt)."""
    with torch.no_grad():
        return token_loss(image_logits(janus.model, encode_prompts(janus, prompts), image_tokens.to(janus.device)), image_tokens)


def slot_logits(model: Any, prompts: Prompts, slots: torch.Tensor, embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`image_logits` with the text embeddings at ``slots`` (B x N positions) replaced by ``embeds`` (B x N x D)."""
    text = model.get_input_embeddings()(prompts.input_ids)
    rows = torch.arange(len(prompts), device=text.device)[:, None].expand_as(slots)
    text = text.index_put((rows, slots), embeds.to(text.dtype))
    image = model.prepare_embeddings_for_image_generation(tokens[:, :-1])
    embeds_all = torch.cat([text, image], dim=1)
    n, length = tokens.shape[1], prompts.input_ids.shape[1]
    mask = torch.cat([prompts.attention_mask, prompts.attention_mask.new_ones(len(prompts), n - 1)], dim=1)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.model.language_model(inputs_embeds=embeds_all, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    return model.model.generation_head(hidden[:, length - 1 :])


def _slots(janus: Janus, prompts: Prompts, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The positions of the adversarial words in tokenised prompts (left-padded), checked to hold ``ids`` (B x N)."""
    first = (prompts.attention_mask == 0).long().sum(1, keepdim=True)  # left padding before the first real token
    slots = first + start + torch.arange(ids.shape[1], device=first.device)[None]
    held = prompts.input_ids.gather(1, slots)
    if not torch.equal(held.cpu(), ids.cpu()):
        bad = int((held.cpu() != ids.cpu()).any(1).nonzero()[0, 0])
        raise ErasekitError(f"the adversarial words {janus.tokenizer.decode(ids[bad].tolist())!r} do not tokenize back to their own tokens "
                            "in Janus's prompt format; this tokenizer needs --vocabulary toy")
    return slots


def search_janus_tokens(
    janus: Janus,
    prompts: Sequence[str],
    image_tokens: torch.Tensor,
    candidates: Candidates,
    tokens: int,
    iterations: int,
    lr: float,
    seeds: Sequence[int],
    progress: SearchProgress | None = None,
) -> SearchResult:
    """Choose ``tokens`` adversarial words per prompt minimising the Janus's cross-entropy of the base model's ``image_tokens`` (B x N).

    Prompt i draws its start tokens from ``seeds[i]`` alone and its loss moves only its own words. ``lr`` is relative
    to the per-coordinate spread of the candidates' embeddings, so one value suits any model width.
    """
    model = janus.model
    device = janus.device
    image_tokens = image_tokens.to(device)
    check_janus_lengths(janus, prompts, tokens)
    cand = model.get_input_embeddings().weight[candidates.ids.to(device)].detach().float()
    start = prefix_length(janus)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    first = torch.stack([torch.randint(len(candidates.ids), (tokens,), generator=g) for g in generators]).to(device)
    plain_loss = plain_losses(janus, prompts, image_tokens)

    def step_loss(idx: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        # straight-through: the model sees exactly the tokens' own embedding rows, the gradient moves the free vectors
        used = cand[idx] + (free - free.detach())
        encoded = encode_prompts(janus, [" ".join(candidates.words[int(j)] for j in row) + " " + p for row, p in zip(idx.cpu(), prompts)])
        slots = _slots(janus, encoded, candidates.ids.to(device)[idx], start)
        return token_loss(slot_logits(model, encoded, slots, used, image_tokens), image_tokens)

    return pez_search(cand, first, candidates, iterations, lr, plain_loss, step_loss, progress)
