"""All-but-One (Hong, Lee & Woo, AAAI 2024, arXiv 2312.12807): a surgical update of the target's guidance term.

Classifier-free guidance steers by ``eps(x, c) - eps(x, 0)``. All-but-One trains the model so that the target's
guidance term becomes the frozen model's guidance term for a user-chosen concept ``into`` (default the empty
prompt: the target then guides nowhere), while the unconditional score, which every prompt's sample is built on,
is held to the frozen model's:

    L = || (eps(x_t, c) - eps(x_t, 0)) - (eps0(x_t, c_into) - eps0(x_t, 0)) ||^2 + lambda || eps(x_t, 0) - eps0(x_t, 0) ||^2

x_t comes from a DDIM rollout of the target prompt by the model being trained (ESD's convention, DESIGN.md §3),
queried at the grid timestep of the state it produced. Built from the paper's description; no code was read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit import distributed as dist
from erasekit.errors import SettingError
from erasekit.families import Cond
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, Progress, TrainConfig
from erasekit.methods.trainer import Setup, prepare, train
from erasekit.result import ErasureResult


@dataclass
class AllButOneConfig(TrainConfig):
    """All-but-One: move the target's guidance term onto ``into``'s and hold the unconditional score still."""

    into: str = field(default="", metadata={"help": "Concept the target turns into: its guidance term is trained onto this one's (empty: the empty prompt, no guidance)."})
    preserve_weight: float = field(default=1.0, metadata={"help": "lambda: weight of the unconditional-drift constraint ||eps(x,0) - eps0(x,0)||^2."})

    def check_concepts(self, targets: Sequence[str]) -> None:
        """Refuse an ``into`` that is one of the concepts being erased."""
        into = " ".join(self.into.lower().split())
        if into and any(into == " ".join(t.lower().split()) for t in targets):
            raise SettingError("into", f"{{name}} {self.into!r} is the concept being erased; choose another concept to turn it into, or leave it empty")


def guidance_losses(pred: torch.Tensor, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(guidance_loss, drift_loss) from ``pred`` = [eps(x,0), eps(x,c)] and ``frozen`` = [eps0(x,0), eps0(x,c_into)] (rows)."""
    guidance = F.mse_loss(pred[1:2] - pred[:1], frozen[1:2] - frozen[:1])
    drift = F.mse_loss(pred[:1], frozen[:1])
    return guidance, drift


def _loop(s: Setup[Any], progress: Progress | None, emb_into: Cond) -> None:
    """One rollout of a target per batch entry; the model steps on the mean of guidance + lambda * drift."""
    cfg, tr = s.config, s.trainable
    tensors = list(tr.params.values())
    for step in range(s.done, cfg.iterations):
        s.between_steps = False
        s.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64)
        j = 0
        for b in range(cfg.batch_size):
            j = int(torch.randint(len(s.targets), (1,), generator=s.generator))
            (level,), start = s.draw_levels(1)  # drawn on every process, so all stay in step
            if b % s.world != s.rank:
                continue
            with dist.autocast(cfg.precision, start.device):
                x = s.schedule.rollout(tr.eps, start, s.emb_targets[j], s.uncond, [level.steps], cfg.start_guidance)[0].float()
                xs = torch.cat([x, x])
                t = torch.full((2,), level.t, device=x.device)
                frozen = tr.frozen_eps(xs, t, Cond.cat([s.emb_null, emb_into[j]])).float()
                pred = tr.eps(xs, t, Cond.cat([s.emb_null, s.emb_targets[j]])).float()
            guidance, drift = guidance_losses(pred, frozen)
            ((guidance + cfg.preserve_weight * drift) / cfg.batch_size).backward()
            sums += torch.stack([guidance.detach(), drift.detach()]).double().cpu()
        if s.world > 1:
            sums = dist.all_reduce_grads(tensors, sums)
        guidance, drift = (sums / cfg.batch_size).float().unbind()
        s.optimizer.step()
        record: dict[str, Any] = {"step": step + 1, "target": s.targets[j], "erase_loss": round(guidance.item(), 6), "preserve_loss": round(drift.item(), 6)}
        s.end_step(step + 1, record, guidance, drift, None, progress)


def fit_all_but_one(pipe: Pipeline, request: ErasureRequest, config: AllButOneConfig, progress: Progress | None) -> ErasureResult:
    """Train the configured parameters so the target guides as ``into`` does, the unconditional score held still."""
    from erasekit.concepts import check_prompt, encode_cond
    from erasekit.errors import ErasekitError

    if request.preserve:
        raise ErasekitError("all-but-one preserves through its unconditional-drift constraint and takes no --preserve; drop it")
    config.check_concepts(request.targets)
    s = prepare(pipe, request, config)
    if config.into:
        into = check_prompt(pipe, config.into, "into concept")
        emb_into = encode_cond(pipe, [into] * len(s.targets))
    else:
        emb_into = Cond.cat([s.emb_null] * len(s.targets))

    def loop(s: Setup[Any], progress: Progress | None) -> None:
        _loop(s, progress, emb_into)

    return train(s, request, "all-but-one", loop, None, 1, progress)
