"""Discrete adversarial-token search against an erased model (UnlearnDiffAtk, Zhang et al., ECCV 2024).

The attack prepends N tokens to a prompt and chooses them so that the *erased* model denoises a
noised image of the concept (made by the base model) as if it still knew the concept:

    min_{tokens}  E_{t, eps} || eps_erased(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, text(tokens + prompt)) - eps ||^2

The token choice is relaxed PEZ-style (Wen et al. 2023, "Hard Prompts Made Easy"): every adversarial
slot holds a free vector in the token-embedding space; each step projects it to the nearest candidate
token (cosine), runs the model on the *projected* embeddings, and applies the gradient to the free
vector (straight-through). So every loss we record is the loss of a real, discrete prompt, and the best
one seen is kept. The expectation is a fixed set of (t, eps) draws per prompt, stratified over t, so
that the search is deterministic for a seed and its losses are comparable across steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.errors import ErasekitError

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


def encode_with_slots(text_encoder: nn.Module, input_ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Text-encoder outputs (B x 77 x d) with token positions 1..N replaced by ``slots`` (B x N x d) embeddings.

    A forward hook on the token-embedding table swaps the rows in, so position embeddings, the causal
    mask and the final norm are the encoder's own, whatever its version.
    """
    n = slots.shape[1]

    def swap(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return torch.cat([output[:, :1], slots.to(output.dtype), output[:, 1 + n :]], dim=1)

    handle = text_encoder.get_input_embeddings().register_forward_hook(swap)  # type: ignore[operator]
    try:
        return text_encoder(input_ids)[0]
    finally:
        handle.remove()


def noise_draws(
    x0: torch.Tensor, alphas_cumprod: torch.Tensor, draws: int, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``draws`` fixed (t, eps) per image from its own generator, t stratified over [0, T): x_t, t and eps, image-major."""
    num_train = alphas_cumprod.shape[0]
    u = torch.stack([torch.rand(draws, generator=g) for g in generators])
    t = ((torch.arange(draws)[None] + u) / draws * num_train).long().clamp(max=num_train - 1).flatten()
    eps = torch.cat([torch.randn((draws, *x0.shape[1:]), generator=g) for g in generators]).to(x0)
    a = alphas_cumprod[t].to(x0).view(-1, *([1] * (x0.dim() - 1)))
    x_t = a.sqrt() * x0.repeat_interleave(draws, 0) + (1 - a).sqrt() * eps
    return x_t, t.to(x0.device), eps


def denoise_loss(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: torch.Tensor, draws: int) -> torch.Tensor:
    """Per-prompt mean of ||eps_theta(x_t, t, cond) - eps||^2 over its draws (B values)."""
    dtype = next(unet.parameters()).dtype
    pred = unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype).repeat_interleave(draws, 0)).sample
    return F.mse_loss(pred.float(), eps.float(), reduction="none").flatten(1).mean(1).view(-1, draws).mean(1)


def search_tokens(
    text_encoder: nn.Module,
    unet: nn.Module,
    tokenizer: object,
    alphas_cumprod: torch.Tensor,
    prompts: Sequence[str],
    x0: torch.Tensor,
    candidates: Candidates,
    tokens: int,
    iterations: int,
    lr: float,
    draws: int,
    seeds: Sequence[int],
    progress: SearchProgress | None = None,
) -> SearchResult:
    """Choose ``tokens`` adversarial tokens per prompt (each prompt its own) minimising the erased model's denoising loss.

    ``x0`` holds one clean latent per prompt (the base model's image of the concept). Prompt i draws its
    start tokens and its (t, eps) from ``seeds[i]`` alone and its loss moves only its own tokens, so a
    prompt's result does not depend on which other prompts share its batch. ``lr`` is relative to the
    per-coordinate spread of the candidates' embeddings, so one value suits any encoder width.
    """
    device = x0.device
    table = text_encoder.get_input_embeddings().weight.detach()  # type: ignore[operator]
    cand = table[candidates.ids.to(table.device)].to(device=device, dtype=torch.float32)
    cand_unit = F.normalize(cand, dim=-1)
    b = len(prompts)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    start = torch.stack([torch.randint(len(candidates.ids), (tokens,), generator=g) for g in generators])
    input_ids = _slot_ids(tokenizer, prompts, [[candidates.words[int(j)] for j in row] for row in start], tokens).to(device)
    x_t, t, eps = noise_draws(x0, alphas_cumprod, draws, generators)

    with torch.no_grad():
        plain_ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,  # type: ignore[operator,attr-defined]
                              truncation=True, return_tensors="pt").input_ids.to(device)
        plain_loss = denoise_loss(unet, x_t, t, eps, text_encoder(plain_ids)[0], draws)

    free = cand[start.to(device)].clone().requires_grad_(True)
    optimiser = torch.optim.Adam([free], lr=lr * float(cand.std()))
    best_loss = torch.full((b,), float("inf"), device=device)
    best_idx = start.to(device).clone()
    best_step = torch.zeros(b, dtype=torch.long)
    history: list[float] = []
    initial = torch.empty(0)
    for step in range(iterations + 1):
        idx = (F.normalize(free.detach(), dim=-1) @ cand_unit.T).argmax(-1)
        hard = cand[idx]
        # straight-through: the model sees the real tokens' embeddings, the gradient moves the free vectors
        used = free + (hard - free).detach()
        final = step == iterations
        with torch.set_grad_enabled(not final):
            per_prompt = denoise_loss(unet, x_t, t, eps, encode_with_slots(text_encoder, input_ids, used), draws)
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


def _slot_ids(tokenizer: object, prompts: Sequence[str], words: list[list[str]], tokens: int) -> torch.Tensor:
    """Token ids of 'w1 .. wN prompt' padded to the encoder's length; positions 1..N are the adversarial slots."""
    texts = [" ".join(row) + " " + p for row, p in zip(words, prompts)]
    limit = tokenizer.model_max_length  # type: ignore[attr-defined]
    for p, text in zip(prompts, texts):
        n = len(tokenizer(text).input_ids)  # type: ignore[operator]
        if n > limit:
            raise ErasekitError(f"prompt {p[:40]!r} plus {tokens} adversarial tokens is {n} tokens; the text encoder takes {limit}: "
                                "shorten it or lower --tokens")
    ids = tokenizer(texts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids  # type: ignore[operator]
    return ids
