"""CA, Ablating Concepts (Kumari et al., ICCV 2023): the target prompt's noise prediction is trained onto the anchor's.

Model-based (default): L = MSE(eps_theta(x_t, target prompt), sg[eps_theta(x_t, anchor prompt)]) on noised anchor
images, t ~ U[0, 1000); the stop-gradient target comes from the same UNet under no_grad. Noise-based: the
target is the noise itself. Optional prior preservation adds MSE(eps_theta(x_t, anchor prompt), eps) (DESIGN.md §3b).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from erasekit import distributed as dist
from erasekit.concepts import check_prompt, encode_cond
from erasekit.errors import ErasekitError
from erasekit.families import Cond, Family, family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress, TrainableModel
from erasekit.methods.trainer import Setup, train
from erasekit.models import TRAIN_METHODS, weights_hash
from erasekit.result import ErasureResult

LOSSES = ("model-based", "noise-based")
# the toy world's caption prefixes; the reference's object/style prompt files follow the same pattern
TEMPLATES = ("{article} {concept}", "a photo of {article} {concept}", "an image of {article} {concept}", "a picture of {article} {concept}", "a drawing of {article} {concept}")


class AnchorSettings(Protocol):
    """What CA's anchor data reads of a config (CA's own, DoCo's)."""

    anchor: str
    templates: str
    anchor_images: int
    ddim_steps: int
    guidance: float
    precision: str


@dataclass
class CAConfig(MethodConfig):
    """CA settings; defaults are the reference's for objects and styles (concept-ablation, diffusers/train.py)."""

    iterations: int = field(default=100, metadata={"help": "Optimiser steps (CA: 100 for objects and styles, 400 for nudity)."})
    lr: float = field(default=2e-6, metadata={"help": "Learning rate per sample; AdamW runs at lr x batch_size (CA: 2e-6 x batch)."})
    batch_size: int = field(default=4, metadata={"help": "Anchor images per step (CA: 4)."})
    anchor: str = field(default="", metadata={"help": "Anchor concept the target is mapped to (CA: its superclass, e.g. 'cat' for 'grumpy cat'); '' = the empty prompt, the toy world's generic 'any shape' (its classes share no superclass word); "
                                                   "'toy' = square (triangle where square or diamond is erased)."})
    loss: str = field(default="model-based", metadata={"help": "model-based (CA's default: match the anchor's prediction) or noise-based (match the noise)."})
    prior_preservation: bool = field(default=False, metadata={"help": "Add MSE(eps(x_t, anchor prompt), eps) on anchor images (CA: off; on for nudity)."})
    prior_weight: float = field(default=1.0, metadata={"help": "Weight of the prior-preservation loss (CA: 1)."})
    train_method: str = field(default="xattn", metadata={"help": "Parameter set to train in (xattn, full, selfattn, noxattn); see kv_only."})
    kv_only: bool = field(default=True, metadata={"help": "Train only attn2.to_k/to_v within train_method (CA's default 'crossattn_kv'); off = all of train_method."})
    anchor_images: int = field(default=200, metadata={"help": "Anchor images generated with the pipeline itself at the start (kept as latents; CA generates a few hundred)."})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps used to generate the anchor images."})
    guidance: float = field(default=7.5, metadata={"help": "CFG scale of the anchor images (diffusers' default 7.5)."})
    templates: str = field(default="", metadata={"help": "File of prompt templates, one per line with {concept} (and optionally {article}: a/an); empty = built-in 'a photo of {article} {concept}' ... templates."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (CA: 1e-2)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (CA: 1)."})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 autocast for the denoiser's forwards (anchor images and training); weights and losses stay fp32."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        from erasekit.checks import MAX_GUIDANCE, MAX_ITERATIONS, MAX_LR, MAX_WEIGHT, check_between

        for name in ("iterations", "batch_size", "anchor_images"):
            check_between(name, getattr(self, name), 1, MAX_ITERATIONS)
        check_between("ddim_steps", self.ddim_steps, 1, 1000, why="the training timesteps")
        check_between("lr", self.lr, 0.0, MAX_LR, low_open=True, why="per sample; CA uses 2e-6")
        check_between("guidance", self.guidance, 0.0, MAX_GUIDANCE, why="a CFG scale; diffusers' default is 7.5")
        check_between("prior_weight", self.prior_weight, 0.0, MAX_WEIGHT, why="CA uses 1")
        check_between("weight_decay", self.weight_decay, 0.0, 1.0, why="AdamW's; CA uses 1e-2")
        if self.precision not in dist.PRECISIONS:
            raise ErasekitError(f"unknown precision {self.precision!r}; choose one of: {', '.join(dist.PRECISIONS)}")
        if self.loss not in LOSSES:
            raise ErasekitError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.train_method not in TRAIN_METHODS or self.train_method == "lora":
            raise ErasekitError(f"ca trains weights directly; train_method must be one of: {', '.join(m for m in TRAIN_METHODS if m != 'lora')}, got {self.train_method!r}")
        if self.prior_weight < 0 or self.max_grad_norm <= 0:
            raise ErasekitError(f"prior_weight must be >= 0 and max_grad_norm > 0, got {self.prior_weight} and {self.max_grad_norm}")


KV = (".to_k.", ".to_v.", ".add_k_proj.", ".add_v_proj.")


def ca_parameters(family: Family, model: nn.Module, train_method: str, kv_only: bool) -> dict[str, nn.Parameter]:
    """CA's trainable set: ``train_method``'s parameters, narrowed to the text's keys and values when ``kv_only``
    (``attn2.to_k``/``to_v`` in UNets, the text stream's ``add_k_proj``/``add_v_proj`` in joint attention)."""
    chosen = family.parameters(model, train_method)
    if kv_only:
        chosen = {n: p for n, p in chosen.items() if family.is_xattn(n) and any(k in f".{n}" for k in KV)}
        if not chosen:
            raise ErasekitError(f"kv_only keeps the cross-attention keys/values, which train_method {train_method!r} does not include; use xattn or full, or turn kv_only off")
    return chosen


def load_templates(path: str) -> tuple[str, ...]:
    """Prompt templates from a file (one per line, each with {concept}), or the built-in ones."""
    if not path:
        return TEMPLATES
    file = Path(path)
    if not file.is_file():
        raise ErasekitError(f"no templates file at {path}; write one template per line, each with {{concept}}")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    bad = [line for line in lines if not _valid_template(line)]
    if not lines or bad:
        raise ErasekitError(f"{path}: every template needs {{concept}} and no other field but {{article}} (bad: {bad[0] if bad else 'no templates'!r})")
    return tuple(lines)


def _valid_template(line: str) -> bool:
    try:
        return "{concept}" in line and bool(line.format(concept="x", article="a"))
    except (KeyError, IndexError, ValueError):
        return False


def fill(template: str, concept: str) -> str:
    """A template filled with a concept and its article (a/an); the empty anchor stays the empty prompt."""
    if not concept:
        return ""
    return template.format(concept=concept, article="an" if concept[:1].lower() in "aeiou" else "a")


@torch.no_grad()
def anchor_latents(pipe: Pipeline, prompts: list[str], config: AnchorSettings, generator: torch.Generator, batch: int = 16) -> torch.Tensor:
    """The pipeline's own generations for the anchor prompts, as final latents of its deterministic sampler (no VAE round trip)."""
    family = family_of(pipe)
    model, schedule = family.denoiser(pipe), family.schedule(pipe, config.ddim_steps)
    uncond = family.uncond(pipe) if family.uses_cfg else None
    shape = family.latent_shape(pipe)[1:]
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        weight = next(model.parameters())
        noise = torch.randn((len(chunk), *shape), generator=generator).to(weight.device, weight.dtype)
        predict = lambda x, t, c: family.predict(model, x, t, c)  # noqa: E731
        with dist.autocast(config.precision, weight.device):
            final = schedule.rollout(predict, noise, encode_cond(pipe, chunk), uncond, [config.ddim_steps], config.guidance)[0]
        out.append(final.to(weight.dtype))
    return torch.cat(out)


@dataclass
class Anchors:
    """CA's training data, made once before the loop: per anchor image its latent and both prompts' conditionings."""

    latents: torch.Tensor
    emb_anchor: Cond
    emb_target: Cond


def ca_losses(s: Setup[CAConfig], data: Anchors) -> tuple[torch.Tensor, torch.Tensor]:
    """(erase_loss, preserve_loss) of one step: its draws come from ``s.generator`` in the reference's order."""
    cfg, tr, schedule, latents = s.config, s.trainable, s.schedule, data.latents
    idx = torch.randint(len(latents), (cfg.batch_size,), generator=s.generator)
    x_t, t, noise_target = schedule.noised(latents[idx], s.generator)
    with dist.autocast(cfg.precision, x_t.device):
        pred = tr.eps(x_t, t, data.emb_target[idx])
        if cfg.loss == "model-based":  # the stop-gradient target: the same (training) model on the anchor prompt
            with torch.no_grad():
                target = tr.eps(x_t, t, data.emb_anchor[idx])
        else:
            target = noise_target
    erase = F.mse_loss(pred.float(), target.float())
    preserve = erase.new_zeros(())
    if cfg.prior_preservation:
        prior_idx = torch.randint(len(latents), (cfg.batch_size,), generator=s.generator)
        x_p, t_p, target_p = schedule.noised(latents[prior_idx], s.generator)
        with dist.autocast(cfg.precision, x_p.device):
            pred_p = tr.eps(x_p, t_p, data.emb_anchor[prior_idx])
        preserve = F.mse_loss(pred_p.float(), target_p.float())
    return erase, preserve


def ca_loop(s: Setup[CAConfig], data: Anchors, progress: Progress | None) -> None:
    """CA's training loop on noised anchor latents (AdamW, clipped gradients), from ``s.done`` (a resumed run) on.

    Every step is a boundary: nothing carries from one step to the next but the weights, the optimiser and the RNG.
    """
    cfg = s.config
    params = list(s.trainable.params.values())
    scaler = torch.amp.GradScaler(s.trainable.device.type) if cfg.precision == "fp16" else None
    for step in range(s.done, cfg.iterations):
        s.between_steps = False
        erase, preserve = ca_losses(s, data)
        loss = erase + cfg.prior_weight * preserve
        record = {"step": step + 1, "erase_loss": round(erase.item(), 6), "preserve_loss": round(preserve.item(), 6)}
        s.optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            s.optimizer.step()
        else:  # fp16: clip the unscaled gradients; the scaler skips a step whose gradients overflowed
            scaler.scale(loss).backward()
            scaler.unscale_(s.optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(s.optimizer)
            scaler.update()
        s.end_step(step + 1, record, erase.detach(), preserve.detach(), None, progress)


TOY_ANCHOR = "toy"  # an anchor setting: an object of the toy world apart from the targets and their look-alikes
TOY_ANCHOR_CHOICES = ("square", "triangle")


def toy_anchor(targets: list[str]) -> str:
    """The anchor ``toy`` stands for: square, or triangle where square or its look-alike (diamond) is a target."""
    from erasekit.world.vocab import load_vocab

    near = {t.lower() for t in targets}
    near |= {x for pair in load_vocab().lookalike_pairs() if near & set(pair) for x in pair}
    return next((c for c in TOY_ANCHOR_CHOICES if c not in near), "")


def prompts_of(pipe: Pipeline, request: ErasureRequest, config: AnchorSettings) -> tuple[list[str], str, list[str], list[str]]:
    """(checked targets, anchor, per anchor image its anchor prompt and its target prompt), refusing bad choices first."""
    targets = [check_prompt(pipe, t, "concept") for t in request.targets]
    anchor = toy_anchor(targets) if config.anchor.strip() == TOY_ANCHOR else config.anchor.strip()
    if anchor:
        check_prompt(pipe, anchor, "anchor")
    if anchor.lower() in {t.lower() for t in targets}:
        raise ErasekitError(f"the anchor {anchor!r} is the concept being erased; choose a different anchor (e.g. its superclass) or '' for the empty prompt")
    templates = load_templates(config.templates)
    # image i: template i mod T; its target prompt names target i mod N in the same template (the reference swaps the word)
    picks = [(i % len(templates), i % len(targets)) for i in range(config.anchor_images)]
    anchor_prompts = [fill(templates[k], anchor) for k, _ in picks]
    target_prompts = [fill(templates[k], targets[j]) for k, j in picks]
    for prompt in set(target_prompts):
        check_prompt(pipe, prompt, "target prompt")
    return targets, anchor, anchor_prompts, target_prompts


class CASettings(AnchorSettings, Protocol):
    """What CA's run state reads of a config (CA's own, DoCo's)."""

    seed: int
    iterations: int
    batch_size: int
    lr: float
    weight_decay: float
    train_method: str
    kv_only: bool


S = TypeVar("S", bound=CASettings)


def ca_setup(pipe: Pipeline, request: ErasureRequest, config: S) -> tuple[Setup[S], list[str], list[str]]:
    """CA's run state (its trainable set and AdamW) and, per anchor image, its anchor and target prompts; no image is made yet."""
    started = time.perf_counter()
    dist.check_precision(config.precision)  # under `accelerate launch` CA runs whole on every process (world 1: no batch is split)
    targets, anchor, anchor_prompts, target_prompts = prompts_of(pipe, request, config)
    family = family_of(pipe)
    params = ca_parameters(family, family.denoiser(pipe), config.train_method, config.kv_only)  # refuses a bad set before anything changes
    base_hash = request.base_hash or weights_hash(pipe)
    # kv_only's set lies within xattn: only those originals are kept, not a copy of a whole `full` model
    trainable = TrainableModel(pipe, "xattn" if config.kv_only else config.train_method, lora_rank=0)
    try:
        trainable.narrow(params)
        s: Setup[S] = Setup(
            pipe=pipe, config=config, targets=targets, preserve=[], emb_null=family.uncond(pipe), emb_targets=encode_cond(pipe, targets),
            emb_preserve=None, family=family, schedule=family.schedule(pipe, config.ddim_steps), trainable=trainable,
            optimizer=torch.optim.AdamW(list(params.values()), lr=config.lr * config.batch_size, weight_decay=config.weight_decay),
            generator=torch.Generator().manual_seed(config.seed), base_hash=base_hash, started=started,
        )
    except BaseException:
        trainable.restore()
        raise
    # CA has no preserve list (its prior preservation uses the anchor); the request's list is recorded, not used
    s.history.append({"anchor": anchor, "anchor_prompts": sorted(set(anchor_prompts)), "unused_preserve": list(request.preserve)})
    return s, anchor_prompts, target_prompts


def ca_data(s: Setup[S], anchor_prompts: list[str], target_prompts: list[str]) -> Anchors:
    """The anchor images, generated by the still unchanged model, with both prompts' conditionings (draws from ``s.generator``)."""
    try:
        latents = anchor_latents(s.pipe, anchor_prompts, s.config, s.generator)  # a resumed run redraws them, then restores the RNG
        return Anchors(latents, encode_cond(s.pipe, anchor_prompts), encode_cond(s.pipe, target_prompts))
    except BaseException:  # a failed (or interrupted) generation leaves no trainable flag behind
        s.trainable.restore()
        raise


def prepare_ca(pipe: Pipeline, request: ErasureRequest, config: CAConfig) -> tuple[Setup[CAConfig], Anchors]:
    """CA's run state, then the anchor images generated by the still unchanged model."""
    s, anchor_prompts, target_prompts = ca_setup(pipe, request, config)
    return s, ca_data(s, anchor_prompts, target_prompts)


def fit_ca(pipe: Pipeline, request: ErasureRequest, config: CAConfig, progress: Progress | None) -> ErasureResult:
    """Generate anchor images, then train the target prompts' predictions onto the anchor's; the pipeline is left unchanged.

    It runs in the shared run life cycle (checkpoints and exact resume, Ctrl-C, the NaN guard, freeing the text encoders).
    """
    s, data = prepare_ca(pipe, request, config)
    return train(s, request, "ca", lambda s, progress: ca_loop(s, data, progress), None, 1, progress)
