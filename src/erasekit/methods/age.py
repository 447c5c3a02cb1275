"""AGE, Adaptive Guided Erasure (Bui et al., ICLR 2025): ESD whose anchor is an adaptively chosen concept.

The empty-prompt anchor of ESD is replaced by c_t = GumbelSoftmax(pi) . T, a mixture of the K candidates'
whole-prompt embeddings, and the same c_t is the preserved concept (DESIGN.md §3b). In x0 space:
  model step: MSE(x0_theta(z, c_e), x0_0(z, c_t) - eta [x0_0(z, c_e) - x0_0(z, c_t)]) + lambda MSE(x0_theta(z', c_t), x0_0(z', c_t)),
  pi step: maximise the preservation term (the only term that reaches pi, as in the reference's train_age.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.families import Cond
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, Progress
from erasekit.methods.eap import EAPConfig, GumbelSearch
from erasekit.methods.loop import erasure_losses
from erasekit.methods.trainer import Setup, prepare, train
from erasekit.result import ErasureResult

# toy: 150 steps left a fifth of the circles (ESR-1 81 %, 16 images/class, seed 0); 250 erase them (100 % on 8 images/class)


@dataclass
class AGEConfig(EAPConfig):
    """AGE settings; defaults are the reference's for objects (K = 100 candidates, temperature 0.1, hard)."""

    k: int = field(default=100, metadata={"help": "K nearest concepts by L2 over full text embeddings (AGE: 100 for objects and nudity, 1000 for art)."})
    n_centres: int = field(default=100, metadata={"help": "KMeans centres over the distances; = k keeps all K (AGE: 100)."})
    gumbel_temperature: float = field(default=0.1, metadata={"help": "Gumbel-Softmax temperature (AGE: 0.1 objects, 2 nudity)."})
    gumbel_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the logits pi (AGE code: 1e-3)."})
    gumbel_hard: bool = field(default=True, metadata={"help": "Hard straight-through one-hot sample (AGE: objects, nudity); off = soft top-k mixture (art)."})
    gumbel_topk: int = field(default=2, metadata={"help": "Candidates kept in the soft mixture when gumbel_hard is off (AGE: 2 objects, 5 art)."})
    faithful: bool = field(default=False, metadata={"help": "Follow the reference: a frozen second copy, 2 x iterations alternating model and pi steps, fresh rollouts each time."})
    rollout_reuse: int = field(default=2, metadata={"help": "Model steps that reuse one rollout's x_t (fast path; the reference redoes it every iteration)."})

    def validate(self) -> None:
        """Check the mixture settings too."""
        super().validate()
        if self.gumbel_topk < 1:
            raise ErasekitError(f"gumbel_topk must be >= 1, got {self.gumbel_topk}")
        if self.preserve_choice != "adversarial":
            raise ErasekitError("preserve_choice applies to eap; age's anchor is always its adaptive (searched) concept")
        if self.batch_size != 1 or self.precision != "fp32" or self.rollout_share != 1:
            raise ErasekitError("age trains one fp32 rollout point per step (its own loop); drop --batch-size, --precision and --rollout-share")


class AdaptiveAnchor:
    """c_t = y(pi) . T per target: the candidates, their embeddings T and logits pi (from EAP's search)."""

    def __init__(self, search: GumbelSearch, config: AGEConfig) -> None:
        self.search, self.hard, self.topk = search, config.gumbel_hard, config.gumbel_topk

    def noise(self, target: int, generator: torch.Generator) -> torch.Tensor:
        """A fresh Gumbel(0, 1) vector for ``target``'s candidates."""
        u = torch.rand(len(self.search.candidates[target]), generator=generator).clamp(1e-10, 1 - 1e-10)
        return -torch.log(-torch.log(u))

    def weights(self, target: int, noise: torch.Tensor) -> torch.Tensor:
        """y = softmax((pi + g) / tau): straight-through one-hot when hard, else renormalised over its top-k."""
        logits = self.search.logits[target]
        soft = torch.softmax((logits + noise) / self.search.temperature, dim=0)
        if self.hard:
            hard = torch.zeros_like(soft)
            hard[int(torch.argmax(soft.detach()))] = 1.0
            return hard - soft.detach() + soft
        k = min(self.topk, len(soft))
        mask = soft >= torch.topk(soft.detach(), k).values[-1]
        kept = soft * mask
        return kept / kept.sum()

    def embedding(self, target: int, noise: torch.Tensor) -> Cond:
        """The mixture of whole-prompt conditionings (one row), differentiable in pi."""
        return self.search.embeddings[target].mix(self.weights(target, noise)[None])

    def name(self, target: int, noise: torch.Tensor) -> str:
        """The candidate with the largest weight in this draw."""
        return self.search.candidates[target][int(torch.argmax(self.weights(target, noise).detach()))]


def age_step(s: Setup, anchor: AdaptiveAnchor, cache: dict[str, Any] | None, fresh: bool, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(erase_loss, preserve_loss) of one step and the rollout state it used (reused while ``fresh`` is False).

    Rows of the batch: z from c_e and z' from c_t (plus any explicit preserve concept); the frozen model gives
    [eps0(z, c_t), eps0(z, c_e), eps0(z', c_t), ...], i.e. EAP's layout with c_t in place of the empty prompt.
    """
    cfg, tr = s.config, s.trainable
    if fresh or cache is None:
        j = int(torch.randint(len(s.targets), (1,), generator=s.generator))
        (level,), start = s.draw_levels(1)
        noise = anchor.noise(j, s.generator)
        c_t = anchor.embedding(j, noise).detach()
        conds = [s.emb_targets[j], c_t]
        if s.emb_preserve is not None:
            p = step % len(s.preserve)
            conds.append(s.emb_preserve[p])
        x = s.schedule.rollout(tr.eps, start, Cond.cat(conds), s.uncond, [level.steps], cfg.start_guidance)[0]
        t = torch.full((len(x) + 1,), level.t, device=x.device)
        frozen = tr.frozen_eps(torch.cat([x[:1], x]), t, Cond.cat([c_t, *conds]))
        cache = {"j": j, "level": level, "noise": noise, "conds": conds, "x": x, "t": t, "frozen": frozen}
    live = list(cache["conds"])
    # rebuilt every step: the logits moved since the rollout
    live[1] = anchor.embedding(cache["j"], cache["noise"])
    x = cache["x"]
    pred = tr.eps(x, cache["t"][: len(x)], Cond.cat(live))
    erase, preserve = erasure_losses(pred, cache["frozen"], x, s.to_x0(cache["level"]), cfg.negative_guidance, "x0")
    return erase, preserve, cache


def _clear(search: GumbelSearch) -> None:
    for logits in search.logits:
        logits.grad = None


def _record(s: Setup, step: int, cache: dict[str, Any], erase: torch.Tensor, preserve: torch.Tensor, anchor: AdaptiveAnchor) -> dict[str, Any]:
    j = cache["j"]
    return {
        "step": step, "target": s.targets[j], "erase_loss": round(erase.item(), 6), "preserve_loss": round(preserve.item(), 6),
        "anchor": anchor.name(j, cache["noise"]), "most_sensitive": anchor.search.leader(j),
    }


def age_loop(s: Setup, anchor: AdaptiveAnchor, config: AGEConfig, progress: Progress | None) -> None:
    """Fast path: one backward serves both players (theta descends erase + lambda preserve, pi ascends preserve).

    Faithful path: 2 x iterations, even = model step, odd = pi step, with fresh rollouts every iteration.
    Both start at ``s.done`` (a resumed run) and report every finished step to ``s.after_step``.
    """
    search, cache = anchor.search, None
    if config.faithful:
        for it in range(2 * s.done, 2 * config.iterations):
            s.between_steps = False
            erase, preserve, cache = age_step(s, anchor, None, True, it // 2)
            s.optimizer.zero_grad(set_to_none=True)
            if it % 2 == 0:
                (erase + config.preserve_weight * preserve).backward()
                s.optimizer.step()
                _clear(search)
                model_step = (cache, erase.detach(), preserve.detach())  # reported once its pi step is done too
                continue
            (config.preserve_weight * preserve).backward()
            s.optimizer.zero_grad(set_to_none=True)
            search.ascend(cache["j"])
            done = it // 2 + 1
            s.end_step(done, _record(s, done, *model_step, anchor), erase, preserve, search, progress)
        return
    for step in range(s.done, config.iterations):
        s.between_steps = False
        erase, preserve, cache = age_step(s, anchor, cache, step % config.rollout_reuse == 0, step)
        s.optimizer.zero_grad(set_to_none=True)
        (erase + config.preserve_weight * preserve).backward()
        s.optimizer.step()
        if step > 0:  # theta == theta0 before the first update: the preservation term is identically 0 (see loop.fast_loop)
            search.ascend(cache["j"])
        else:
            _clear(search)
        s.end_step(step + 1, _record(s, step + 1, cache, erase, preserve, anchor), erase, preserve, search, progress,
                   boundary=(step + 1) % config.rollout_reuse == 0)


def fit_age(pipe: Pipeline, request: ErasureRequest, config: AGEConfig, progress: Progress | None) -> ErasureResult:
    """Run AGE through the shared run life cycle (checkpoints, resume, Ctrl-C); the pipeline is left as it was."""
    search = GumbelSearch(pipe, [t.strip() for t in request.targets], config)
    s = prepare(pipe, request, config, separate_copy=config.faithful)
    anchor = AdaptiveAnchor(search, config)
    period = 1 if config.faithful else config.rollout_reuse  # a checkpoint is exact where no rollout carries over
    return train(s, request, "age", lambda s, progress: age_loop(s, anchor, config, progress), search, period, progress)
