"""The shared fine-tuning loop of ESD and EAP (fast path: batched forwards, reused rollouts)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from erasekit.concepts import check_prompt, encode
from erasekit.methods.base import ErasureRequest, Progress, TrainableUNet, TrainConfig, esd_target
from erasekit.models import model_id, weights_hash
from erasekit.result import ErasureResult
from erasekit.sampling import ddim_scheduler, ddpm_timestep, predict_x0, rollout


class Draw(Protocol):
    """One draw of the search: its concept's name, and its embedding rebuilt from the current logits."""

    name: str

    def embedding(self) -> torch.Tensor:
        """The differentiable adversarial embedding (1 x 77 x d) of this draw."""


class Search(Protocol):
    """An adversarial search over concepts to preserve (EAP's Gumbel-Softmax, or PGD)."""

    def draw(self, target: int, generator: torch.Generator) -> "Draw":
        """Draw the adversarial concept for ``target`` (one hard sample)."""

    def ascend(self, target: int) -> None:
        """Apply the accumulated gradient as a maximisation step and clear it."""

    def leader(self, target: int) -> str:
        """The concept the search currently finds most sensitive."""

    def summary(self) -> dict[str, Any]:
        """Final state (for the history file)."""


def _loss(pred: torch.Tensor, target: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, space: str) -> torch.Tensor:
    if space == "x0":
        return F.mse_loss(predict_x0(x_t, pred, alpha_bar), predict_x0(x_t, target, alpha_bar))
    return F.mse_loss(pred, target)


def finetune(
    pipe: StableDiffusionPipeline,
    request: ErasureRequest,
    config: TrainConfig,
    progress: Progress | None,
    method: str,
    loss_space: str,
    search: Search | None = None,
    rollout_reuse: int = 1,
    trainable: TrainableUNet | None = None,
) -> ErasureResult:
    """Erase ``request.targets`` with the ESD objective, plus adversarial/explicit preservation terms."""
    started = time.perf_counter()
    targets = [check_prompt(pipe, t, "concept") for t in request.targets]
    preserve = [check_prompt(pipe, p, "preserve concept") for p in request.preserve]
    base_hash = weights_hash(pipe)
    device = pipe.unet.device
    gen = torch.Generator().manual_seed(config.seed)
    emb_null = encode(pipe, [""])
    emb_targets = encode(pipe, targets)
    emb_preserve = encode(pipe, preserve) if preserve else None
    scheduler = ddim_scheduler(pipe, config.ddim_steps)
    alphas = pipe.scheduler.alphas_cumprod.to(device)
    trainable = trainable or TrainableUNet(pipe, config.train_method, config.lora_rank)
    optimizer = torch.optim.Adam(list(trainable.params.values()), lr=config.lr)
    shape = (1, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    history: list[dict[str, Any]] = []
    setup_s = time.perf_counter() - started
    try:
        for step in range(config.iterations):
            if step % rollout_reuse == 0:
                j = int(torch.randint(len(targets), (1,), generator=gen))
                k = int(torch.randint(config.ddim_steps, (1,), generator=gen))
                t_int = ddpm_timestep(k, config.ddim_steps, gen, pipe.scheduler.config.num_train_timesteps)
                start = torch.randn(shape, generator=gen).to(device)
                draw = search.draw(j, gen) if search else None
                conds = [emb_targets[j : j + 1]]
                if draw is not None:
                    conds.append(draw.embedding().detach())
                p_idx = step % len(preserve) if preserve else -1
                if emb_preserve is not None:
                    conds.append(emb_preserve[p_idx : p_idx + 1])
                x_all = rollout(trainable.eps, scheduler, start, torch.cat(conds), emb_null, k, config.start_guidance)
            # the straight-through embedding is rebuilt every step: the logits moved since the rollout
            adv_emb = draw.embedding() if draw is not None else None
            t = torch.full((1,), t_int, device=device)
            a = alphas[t_int]
            x_e = x_all[:1]
            # frozen forwards in one batch: eps0(x_t, 0), eps0(x_t, c_e), then eps0 on each preserved x_t'
            frozen_x = torch.cat([x_e, x_e, x_all[1:]])
            frozen_emb = torch.cat([emb_null, emb_targets[j : j + 1]] + [c.detach() for c in conds[1:]])
            frozen = trainable.frozen_eps(frozen_x, t.expand(len(frozen_x)), frozen_emb).clone()
            live_emb = torch.cat([emb_targets[j : j + 1]] + ([adv_emb] if adv_emb is not None else []) + conds[1 + (adv_emb is not None) :])
            pred = trainable.eps(x_all, t.expand(len(x_all)), live_emb)
            erase_loss = _loss(pred[:1], esd_target(frozen[:1], frozen[1:2], config.negative_guidance), x_e, a, loss_space)
            preserve_terms = [_loss(pred[i : i + 1], frozen[i + 1 : i + 2], x_all[i : i + 1], a, loss_space) for i in range(1, len(x_all))]
            preserve_loss = torch.stack(preserve_terms).sum() if preserve_terms else torch.zeros((), device=device)
            loss = erase_loss + config.preserve_weight * preserve_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if search:
                search.ascend(j)
            record = {
                "step": step + 1,
                "target": targets[j],
                "erase_loss": round(erase_loss.item(), 6),
                "preserve_loss": round(preserve_loss.item(), 6),
            }
            if search:
                record["adversarial"] = draw.name
                record["most_sensitive"] = search.leader(j)
            history.append(record)
            if progress:
                progress(step + 1, config.iterations, record)
        delta, kind = trainable.delta()
    finally:
        trainable.restore()
    total = time.perf_counter() - started
    extra = {"search": search.summary()} if search else {}
    return ErasureResult(
        method=method,
        concepts=tuple(targets),
        preserve=tuple(preserve),
        delta=delta,
        kind=kind,
        config={**asdict(config), **extra.get("config", {})},
        base_model_id=model_id(pipe),
        base_hash=base_hash,
        history=tuple(history + ([{"search": extra["search"]}] if extra else [])),
        timings={"setup_s": round(setup_s, 3), "total_s": round(total, 3)},
    )
