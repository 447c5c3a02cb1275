"""The fine-tuning loops of ESD and EAP: the fast path and the reference-shaped ``faithful`` path.

Both compute the same losses (:func:`erasure_losses`); they differ only in *how*: the fast path keeps
one copy of the weights, batches every forward and shares rollouts; the faithful path keeps a second
frozen copy, redoes both rollouts every iteration and alternates model and search steps (DESIGN.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from erasekit import distributed as dist
from erasekit.errors import ErasekitError
from erasekit.families import Cond, Level
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, Progress, TrainConfig, esd_target
from erasekit.methods.trainer import Draw, Search, Setup, ToX0, prepare, train
from erasekit.result import ErasureResult


def term_loss(pred: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor, to_x0: ToX0, space: str) -> torch.Tensor:
    """MSE between two model outputs, in their own space (ESD: ε) or mapped to x0 (EAP) by ``to_x0(x_t, out)``."""
    if space == "x0":
        return F.mse_loss(to_x0(x_t, pred), to_x0(x_t, target))
    return F.mse_loss(pred, target)


def erasure_losses(
    pred: torch.Tensor, frozen: torch.Tensor, x: torch.Tensor, to_x0: ToX0, eta: float, space: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(erase_loss, preserve_loss) from stacked predictions.

    ``x``/``pred``: rows [x_t, x'_1, ...] and eps_theta on them with [c_e, c_1, ...];
    ``frozen``: [eps0(x_t, 0), eps0(x_t, c_e), eps0(x'_1, c_1), ...]. preserve_loss sums over the x'_i.
    """
    erase = term_loss(pred[:1], esd_target(frozen[:1], frozen[1:2], eta), x[:1], to_x0, space)
    terms = [term_loss(pred[i : i + 1], frozen[i + 1 : i + 2], x[i : i + 1], to_x0, space) for i in range(1, len(x))]
    preserve = torch.stack(terms).sum() if terms else torch.zeros((), device=pred.device)
    return erase, preserve


def _record(s: Setup, step: int, j: int, erase: torch.Tensor, preserve: torch.Tensor, draw: Draw | None, search: Search | None) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "target": s.targets[j], "erase_loss": round(erase.item(), 6), "preserve_loss": round(preserve.item(), 6)}
    if draw is not None and search is not None:
        record["adversarial"] = draw.name
        record["most_sensitive"] = search.leader(j)
    return record


@dataclass
class Row:
    """One rollout point of a step's batch: its target, the adversarial draw, and (on the process that owns it) the rollout."""

    j: int
    draw: Draw | None
    conds: list[Cond] = field(default_factory=list)
    x: torch.Tensor | None = None
    t: torch.Tensor | None = None
    level: Level | None = None
    frozen: torch.Tensor | None = None


def draw_rows(s: Setup, search: Search | None, step: int, share: int = 1) -> list[list[Row]]:
    """``batch_size`` rollout points drawn in the same order on every process; each process rolls out only rows rank::world.

    With ``share`` > 1 each point is a trajectory: one rollout to the largest of ``share`` draws of k gives the
    x_t of ``share`` consecutive model steps, each at its own timestep (one list of rows per batch entry).
    """
    cfg, tr = s.config, s.trainable
    out = []
    for b in range(cfg.batch_size):
        j = int(torch.randint(len(s.targets), (1,), generator=s.generator))
        levels, start = s.draw_levels(share)
        draw = search.draw(j, s.generator) if search else None
        rows = [Row(j, draw, level=level) for level in levels]
        if b % s.world == s.rank:
            conds = s.conditions(j, draw, step)
            with dist.autocast(cfg.precision, start.device):
                states = s.schedule.rollout(tr.eps, start, Cond.cat(conds), s.uncond, [lv.steps for lv in levels], cfg.start_guidance)
                n = len(conds) + 1
                t = torch.cat([torch.full((n,), lv.t, device=start.device) for lv in levels])
                xs = torch.cat([torch.cat([x[:1], x]) for x in states])
                frozen = tr.frozen_eps(xs, t, Cond.cat([s.emb_null, *conds] * len(states))).float()
            for i, (row, x) in enumerate(zip(rows, states)):
                row.conds, row.x, row.t = conds, x.float(), t[i * n : (i + 1) * n]
                row.frozen = frozen[i * n : (i + 1) * n]
        out.append(rows)
    return out


def row_losses(s: Setup, row: Row, loss_space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(erase_loss, preserve_loss) of one owned row with the current weights and logits (forward in the run's precision, losses in fp32)."""
    assert row.x is not None and row.t is not None and row.frozen is not None and row.level is not None
    # the straight-through embedding is rebuilt every step: the logits moved since the rollout
    live = list(row.conds)
    if row.draw is not None:
        live[1] = row.draw.embedding()
    with dist.autocast(s.config.precision, row.x.device):
        pred = s.trainable.eps(row.x, row.t[: len(row.x)], Cond.cat(live))
    return erasure_losses(pred.float(), row.frozen, row.x, s.to_x0(row.level), s.config.negative_guidance, loss_space)


def search_tensors(search: Search | None) -> list[torch.Tensor]:
    """The tensors a search trains (Gumbel logits or PGD embeddings): their gradients are all-reduced with the model's."""
    if search is None:
        return []
    embs = [t for e in getattr(search, "embs", []) for t in (e.parts.values() if isinstance(e, Cond) else [e])]
    return [*getattr(search, "logits", []), *embs]


def fast_loop(s: Setup, loss_space: str, search: Search | None, rollout_reuse: int, progress: Progress | None, rollout_share: int = 1) -> None:
    """One weight copy; per row one batched trainable forward and one batched frozen forward.

    The model step and the search step share one forward and one backward: theta descends
    erase + lambda * preserve while the logits ascend preserve (their gradient's sign is flipped).
    A step averages the losses of ``batch_size`` rollout points; under `accelerate launch` each process
    computes its rows and the gradients (model and search) are summed across processes before the step.
    One rollout serves ``rollout_share`` x ``rollout_reuse`` steps: ``rollout_share`` points along its
    trajectory (distinct timesteps), each reused for ``rollout_reuse`` steps.
    """
    cfg = s.config
    scaler = torch.amp.GradScaler(s.trainable.device.type) if cfg.precision == "fp16" else None
    tensors = list(s.trainable.params.values()) + search_tensors(search)
    group = rollout_reuse * rollout_share
    groups: list[list[Row]] = []
    for step in range(s.done, cfg.iterations):
        s.between_steps = False
        if step % group == 0:
            groups = draw_rows(s, search, step, rollout_share)
        rows = [g[(step % group) // rollout_reuse] for g in groups]
        s.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64)
        for row in rows:
            if row.x is None:
                continue  # another process's row
            erase, preserve = row_losses(s, row, loss_space)
            loss = erase + cfg.preserve_weight * preserve
            if cfg.batch_size > 1:
                loss = loss / cfg.batch_size
            (scaler.scale(loss) if scaler else loss).backward()
            sums += torch.stack([erase.detach(), preserve.detach()]).double().cpu()
        if s.world > 1:
            sums = dist.all_reduce_grads(tensors, sums)
        if cfg.batch_size > 1 or s.world > 1:  # the step's losses: means over the global batch
            erase, preserve = (sums / cfg.batch_size).float().unbind()
        stepped = _step(s, scaler, search)
        if search:
            # before the first model update theta == theta0, so preserve_loss is identically 0: a search step there
            # would only advance Adam's step count (the next real step would then move at 0.73 x lr)
            for j in sorted({row.j for row in rows}):
                if stepped and step > 0:
                    search.ascend(j)
            for tensor in search_tensors(search):
                tensor.grad = None
        record = _record(s, step + 1, rows[0].j, erase, preserve, rows[0].draw, search)
        s.end_step(step + 1, record, erase, preserve, search, progress, boundary=(step + 1) % group == 0)


def _step(s: Setup, scaler: Any, search: Search | None) -> bool:
    """The model's optimiser step; with fp16 loss scaling, unscale every gradient and skip the step on inf/NaN."""
    if scaler is None:
        s.optimizer.step()
        return True
    scaler.unscale_(s.optimizer)
    inverse = 1.0 / scaler.get_scale()
    grads = [t.grad for t in search_tensors(search) if t.grad is not None]
    for g in grads:
        g.mul_(inverse)
    finite = all(bool(torch.isfinite(g).all()) for g in grads + [p.grad for p in s.trainable.params.values() if p.grad is not None])
    scaler.step(s.optimizer)
    scaler.update()
    return finite


def faithful_loop(s: Setup, loss_space: str, search: Search | None, progress: Progress | None) -> None:
    """The reference's cost structure: 2 x iterations, even = model step, odd = search step; each
    iteration redoes one rollout per concept (CFG at batch 2) and one forward per loss term."""
    cfg, tr = s.config, s.trainable
    per_step = 2 if search_tensors(search) else 1  # a search with nothing to train (random/nearest) takes no search iterations
    rounds = per_step * cfg.iterations
    for it in range(per_step * s.done, rounds):
        s.between_steps = False
        model_step = per_step == 1 or it % 2 == 0
        j = int(torch.randint(len(s.targets), (1,), generator=s.generator))
        (level,), start = s.draw_levels(1)
        draw = search.draw(j, s.generator) if search else None
        conds = s.conditions(j, draw, it // per_step)
        xs = [s.schedule.rollout(tr.eps, start, c, s.uncond, [level.steps], cfg.start_guidance)[0] for c in conds]
        t = torch.full((1,), level.t, device=start.device)
        frozen = [tr.frozen_eps(xs[0], t, s.emb_null), tr.frozen_eps(xs[0], t, conds[0])]
        frozen += [tr.frozen_eps(xi, t, ci) for xi, ci in zip(xs[1:], conds[1:])]
        live = list(conds)
        if draw is not None:
            live[1] = draw.embedding()
        preds = [tr.eps(xi, t, ci) for xi, ci in zip(xs, live)]
        erase, preserve = erasure_losses(torch.cat(preds), torch.cat(frozen), torch.cat(xs), s.to_x0(level), cfg.negative_guidance, loss_space)
        s.optimizer.zero_grad(set_to_none=True)
        if model_step:
            (erase + cfg.preserve_weight * preserve).backward()
            s.optimizer.step()
            for tensor in search_tensors(search):
                tensor.grad = None
            reported = (j, erase.detach(), preserve.detach(), draw)  # reported once the search step of the pair is done
        else:
            preserve.backward()
            s.optimizer.zero_grad(set_to_none=True)
            search.ascend(j)  # type: ignore[union-attr]
        if (it + 1) % per_step == 0:
            done = (it + 1) // per_step
            s.end_step(done, _record(s, done, *reported, search), erase, preserve, search, progress)


def finetune(
    pipe: Pipeline,
    request: ErasureRequest,
    config: TrainConfig,
    progress: Progress | None,
    method: str,
    loss_space: str,
    search: Search | None = None,
    rollout_reuse: int = 1,
    faithful: bool = False,
    setup: Setup | None = None,
    rollout_share: int = 1,
) -> ErasureResult:
    """Erase ``request.targets`` with the ESD objective plus adversarial/explicit preservation terms."""
    s = setup or prepare(pipe, request, config, separate_copy=faithful)
    if faithful and (config.batch_size != 1 or config.precision != "fp32" or s.world > 1):
        raise ErasekitError("faithful mode follows the reference: one process, batch_size 1, fp32; drop --faithful to scale out")

    def loop(s: Setup, progress: Progress | None) -> None:
        if faithful:
            faithful_loop(s, loss_space, search, progress)
        else:
            fast_loop(s, loss_space, search, rollout_reuse, progress, rollout_share)

    return train(s, request, method, loop, search, 1 if faithful else rollout_reuse * rollout_share, progress)
