"""Discrete adversarial-token search against an erased model (UnlearnDiffAtk, Zhang et al., ECCV 2024).

The attack prepends N tokens to a prompt and chooses them so that the *erased* model denoises a
noised image of the concept (made by the base model) as if it still knew the concept:

    min_{tokens}  E_{t, eps} || eps_erased(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, text(tokens + prompt)) - eps ||^2

on SD 1.x/2.x and SDXL; on SD3 and FLUX.1 the same with the family's own training draw (rectified flow:
x_σ = (1 - σ) x0 + σ eps, target velocity eps - x0). The model is reached only through its family
(:mod:`erasekit.families`): its schedule's draws, its ``predict`` and its prompt encoding with slots.

The token choice is relaxed PEZ-style (Wen et al. 2023, "Hard Prompts Made Easy"): every adversarial
slot holds a free vector in the CLIP token-embedding space; each step projects it to the nearest candidate
token (cosine), runs the model on the *projected* embeddings, and applies the gradient to the free
vector (straight-through). So every loss we record is the loss of a real, discrete prompt, and the best
one seen is kept. The expectation is a fixed set of (t, eps) draws per prompt, stratified over t, so
that the search is deterministic for a seed and its losses are comparable across steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.families import Cond, Family, Schedule, family_of

# progress(step, steps in total, {"loss": mean loss of the current discrete prompts, "best_loss": ...})
SearchProgress = Callable[[int, int, dict[str, float]], None]
_ALPHA = re.compile(r"^[a-z]{2,}$")


@dataclass(frozen=True)
class Candidates:
    """The tokens an adversarial slot may hold: whole-word token ids and their words."""

    ids: torch.Tensor
    words: tuple[str, ...]


@dataclass(frozen=True)
class SearchResult:
    """Per prompt: the best adversarial tokens found, and the losses that chose them."""

    token_ids: list[list[int]]
    words: list[list[str]]
    initial_loss: list[float]
    best_loss: list[float]
    plain_loss: list[float]
    best_step: list[int]
    loss_history: list[float]

    def prefix(self, i: int) -> str:
        """Prompt i's adversarial tokens as text (whole words, so it re-tokenizes to the same ids)."""
        return " ".join(self.words[i])


def candidate_tokens(tokenizer: object, extra_words: Sequence[str] = (), exclude_words: Sequence[str] = (), whole_vocab: bool = True) -> Candidates:
    """Whole-word tokens of the tokenizer (letters only, >= 2 of them; all of them unless ``whole_vocab`` is
    False) plus the words of ``extra_words``, minus the words of ``exclude_words``.

    A word is kept only when it tokenizes back to exactly its own single token, so a decoded prompt
    reproduces the searched token ids. Phrases are split at non-letters ('plus sign' counts as both words).
    """
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    excluded = set(_split(exclude_words))
    pool = {tok[: -len("</w>")] for tok in vocab if tok.endswith("</w>")} if whole_vocab else set()
    pool |= set(_split(extra_words))
    words = sorted(w for w in pool if _ALPHA.match(w) and w not in excluded)
    encoded = tokenizer(words, add_special_tokens=False).input_ids  # type: ignore[operator]
    kept = [(w, ids[0]) for w, ids in zip(words, encoded) if len(ids) == 1 and vocab.get(w + "</w>") == ids[0]]
    if not kept:
        raise ErasekitError("no candidate token is left for the adversarial prompt; use a larger --vocabulary")
    return Candidates(torch.tensor([i for _, i in kept], dtype=torch.long), tuple(w for w, _ in kept))


def _split(phrases: Sequence[str]) -> list[str]:
    return [part for p in phrases for part in re.split(r"[^a-z]+", p.lower()) if part]


def noise_draws(
    x0: torch.Tensor, schedule: Schedule, draws: int, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``draws`` fixed training draws per image from its own generator, time stratified over [0, 1): x_t, time input and target, image-major.

    The target is the family's: ε (or v) on a DDPM schedule, the flow velocity ε - x0 on a rectified flow.
    """
    u = torch.stack([torch.rand(draws, generator=g) for g in generators])
    fractions = ((torch.arange(draws)[None] + u) / draws).flatten()
    eps = torch.cat([torch.randn((draws, *x0.shape[1:]), generator=g) for g in generators]).to(x0)
    return schedule.noised_at(x0.repeat_interleave(draws, 0), fractions, eps)


def denoise_loss(family: Family, model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, cond: Cond, draws: int) -> torch.Tensor:
    """Per-prompt mean of ||model(x_t, t, cond) - target||^2 over its draws (B values)."""
    dtype = next(model.parameters()).dtype
    pred = family.predict(model, x_t.to(dtype), t, cond.to(dtype=dtype).map(lambda v: v.repeat_interleave(draws, 0)))
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1).view(-1, draws).mean(1)


def search_draws(
    pipe: Any, x0: torch.Tensor, n_candidates: int, tokens: int, draws: int, seeds: Sequence[int], family: Family | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What :func:`search_tokens` draws from ``seeds``: each prompt's start tokens (candidate indices), then its fixed noise draws."""
    family = family or family_of(pipe)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    start = torch.stack([torch.randint(n_candidates, (tokens,), generator=g) for g in generators])
    return start, noise_draws(x0, family.schedule(pipe, 1), draws, generators)  # only the training draws of the schedule are used


def prompt_losses(
    pipe: Any, prompts: Sequence[str], x0: torch.Tensor, n_candidates: int, tokens: int, draws: int, seeds: Sequence[int],
    family: Family | None = None,
) -> torch.Tensor:
    """Per-prompt denoising loss of plain-text ``prompts`` on the draws :func:`search_tokens` makes for ``seeds`` (checks a reported prompt)."""
    family = family or family_of(pipe)
    _, (x_t, t, target) = search_draws(pipe, x0, n_candidates, tokens, draws, seeds, family)
    with torch.no_grad():
        return denoise_loss(family, family.denoiser(pipe), x_t, t, target, family.encode(pipe, prompts), draws)


def search_tokens(
    pipe: Any,
    prompts: Sequence[str],
    x0: torch.Tensor,
    candidates: Candidates,
    tokens: int,
    iterations: int,
    lr: float,
    draws: int,
    seeds: Sequence[int],
    progress: SearchProgress | None = None,
    family: Family | None = None,
) -> SearchResult:
    """Choose ``tokens`` adversarial tokens per prompt (each prompt its own) minimising the erased model's denoising loss.

    ``pipe`` is a pipeline of any family (SD, SDXL, SD3, FLUX.1; ``family`` defaults to its own) and ``x0``
    holds one clean latent per prompt (the base model's image of the concept) in the family's latent layout.
    Prompt i draws its start tokens and its training draws from ``seeds[i]`` alone and its loss moves only
    its own tokens, so a prompt's result does not depend on which other prompts share its batch. ``lr`` is
    relative to the per-coordinate spread of the candidates' embeddings, so one value suits any encoder width.

    A free vector lives in every CLIP encoder's token-embedding space side by side (SDXL and SD3: both
    CLIPs', which share one vocabulary), so the straight-through gradient comes from every CLIP encoder;
    encoders with their own vocabulary (T5 of SD3 and FLUX.1) read the projected words as text.
    """
    family = family or family_of(pipe)
    model = family.denoiser(pipe)
    device = x0.device
    cand = family.slot_rows(pipe, candidates.ids).to(device=device, dtype=torch.float32)
    _check_lengths(family.slot_tokenizer(pipe), prompts, tokens)
    start, (x_t, t, target) = search_draws(pipe, x0, len(candidates.ids), tokens, draws, seeds, family)

    with torch.no_grad():
        plain_loss = denoise_loss(family, model, x_t, t, target, family.encode(pipe, prompts), draws)

    def step_loss(idx: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        # straight-through: the model sees the real tokens' embeddings, the gradient moves the free vectors
        used = free + (cand[idx] - free).detach()
        texts = _texts(prompts, [[candidates.words[int(j)] for j in row] for row in idx.cpu()])
        return denoise_loss(family, model, x_t, t, target, family.encode_with_slots(pipe, texts, used), draws)

    return pez_search(cand, start.to(device), candidates, iterations, lr, plain_loss, step_loss, progress)


def pez_search(cand: torch.Tensor, first: torch.Tensor, candidates: Candidates, iterations: int, lr: float, plain_loss: torch.Tensor,
               step_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], progress: SearchProgress | None = None) -> SearchResult:
    """PEZ's loop over free vectors started at ``cand[first]``: project each to its nearest candidate (cosine), take
    ``step_loss(indices, free)`` (per prompt, of the projected discrete prompts; the caller builds the straight-through
    embeddings), keep each prompt's best, step Adam; the last of ``iterations + 1`` evaluations takes no step.
    Shared by the diffusion and the Janus attack."""
    device = cand.device
    b = first.shape[0]
    cand_unit = F.normalize(cand, dim=-1)
    free = cand[first].clone().requires_grad_(True)
    optimiser = torch.optim.Adam([free], lr=lr * float(cand.std()))
    best_loss = torch.full((b,), float("inf"), device=device)
    best_idx = first.clone()
    best_step = torch.zeros(b, dtype=torch.long)
    history: list[float] = []
    initial = torch.empty(0)
    for step in range(iterations + 1):
        idx = (F.normalize(free.detach(), dim=-1) @ cand_unit.T).argmax(-1)
        final = step == iterations
        with torch.set_grad_enabled(not final):
            per_prompt = step_loss(idx, free)
        values = per_prompt.detach()
        if step == 0:
            initial = values.clone()
        better = values < best_loss
        best_loss = torch.where(better, values, best_loss)
        best_idx[better] = idx[better]
        best_step[better.cpu()] = step
        history.append(float(values.mean()))
        if not final:
            (grad,) = torch.autograd.grad(per_prompt.sum(), free)
            free.grad = grad
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
        if progress:
            progress(step, iterations, {"loss": history[-1], "best_loss": float(best_loss.mean())})
    ids = candidates.ids[best_idx.cpu()]
    words = [[candidates.words[int(j)] for j in row] for row in best_idx.cpu()]
    return SearchResult(ids.tolist(), words, initial.cpu().tolist(), best_loss.cpu().tolist(), plain_loss.cpu().tolist(), best_step.tolist(), history)


def _texts(prompts: Sequence[str], words: list[list[str]]) -> list[str]:
    """'w1 .. wN prompt': the adversarial prompts as text (the words are single CLIP tokens, at positions 1..N)."""
    return [" ".join(row) + " " + p for row, p in zip(words, prompts)]


def _check_lengths(tokenizer: object, prompts: Sequence[str], tokens: int) -> None:
    """Refuse a prompt that, with ``tokens`` single-token words before it, is longer than the CLIP encoder takes."""
    limit = tokenizer.model_max_length  # type: ignore[attr-defined]
    for p in prompts:
        n = len(tokenizer(p).input_ids) + tokens  # type: ignore[operator]
        if n > limit:
            raise ErasekitError(f"prompt {p[:40]!r} plus {tokens} adversarial tokens is {n} tokens; the text encoder takes {limit}: "
                                "shorten it or lower --tokens")
