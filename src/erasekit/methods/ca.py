"""CA, Ablating Concepts (Kumari et al., ICCV 2023): the target prompt's noise prediction is trained onto the anchor's.

Model-based (default): L = MSE(eps_theta(x_t, target prompt), sg[eps_theta(x_t, anchor prompt)]) on noised anchor
images, t ~ U[0, 1000); the stop-gradient target comes from the same UNet under no_grad. Noise-based: the
target is the noise itself. Optional prior preservation adds MSE(eps_theta(x_t, anchor prompt), eps) (DESIGN.md §3b).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.concepts import check_prompt, encode_cond
from erasekit.errors import ErasekitError
from erasekit.families import Cond, Family, Schedule, family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ALL_FAMILIES, ErasureRequest, MethodConfig, Progress, make_result, register_method
from erasekit.models import TRAIN_METHODS, weights_hash
from erasekit.result import ErasureResult

LOSSES = ("model-based", "noise-based")
# the toy world's caption prefixes; the reference's object/style prompt files follow the same pattern
TEMPLATES = ("{article} {concept}", "a photo of {article} {concept}", "an image of {article} {concept}", "a picture of {article} {concept}", "a drawing of {article} {concept}")


@dataclass
class CAConfig(MethodConfig):
    """CA settings; defaults are the reference's for objects and styles (concept-ablation, diffusers/train.py)."""

    iterations: int = field(default=100, metadata={"help": "Optimiser steps (CA: 100 for objects and styles, 400 for nudity)."})
    lr: float = field(default=2e-6, metadata={"help": "Learning rate per sample; AdamW runs at lr x batch_size (CA: 2e-6 x batch)."})
    batch_size: int = field(default=4, metadata={"help": "Anchor images per step (CA: 4)."})
    anchor: str = field(default="", metadata={"help": "Anchor concept the target is mapped to (CA: its superclass, e.g. 'cat' for 'grumpy cat'); '' = the empty prompt, the toy world's generic 'any shape' (its classes share no superclass word)."})
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

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        for name in ("iterations", "batch_size", "anchor_images", "ddim_steps"):
            if getattr(self, name) < 1:
                raise ErasekitError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ErasekitError(f"lr must be > 0, got {self.lr}")
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
def anchor_latents(pipe: Pipeline, prompts: list[str], config: CAConfig, generator: torch.Generator, batch: int = 16) -> torch.Tensor:
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
        out.append(schedule.rollout(predict, noise, encode_cond(pipe, chunk), uncond, [config.ddim_steps], config.guidance)[0])
    return torch.cat(out)


def ablate(
    family: Family, model: nn.Module, params: dict[str, nn.Parameter], latents: torch.Tensor, emb_target: Cond, emb_anchor: Cond,
    schedule: Schedule, config: CAConfig, generator: torch.Generator, progress: Progress | None,
) -> list[dict]:
    """CA's training loop on noised anchor latents (AdamW, clipped gradients); returns one record per step."""
    history: list[dict] = []
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr * config.batch_size, weight_decay=config.weight_decay)
    for step in range(1, config.iterations + 1):
        idx = torch.randint(len(latents), (config.batch_size,), generator=generator)
        x_t, t, noise_target = schedule.noised(latents[idx], generator)
        pred = family.predict(model, x_t, t, emb_target[idx])
        if config.loss == "model-based":
            with torch.no_grad():
                target = family.predict(model, x_t, t, emb_anchor[idx])
        else:
            target = noise_target
        erase_loss = F.mse_loss(pred, target)
        preserve_loss = erase_loss.new_zeros(())
        if config.prior_preservation:
            prior_idx = torch.randint(len(latents), (config.batch_size,), generator=generator)
            x_p, t_p, target_p = schedule.noised(latents[prior_idx], generator)
            preserve_loss = F.mse_loss(family.predict(model, x_p, t_p, emb_anchor[prior_idx]), target_p)
        loss = erase_loss + config.prior_weight * preserve_loss
        record = {"step": step, "erase_loss": round(erase_loss.item(), 6), "preserve_loss": round(preserve_loss.item(), 6)}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        history.append(record)
        if progress:
            progress(step, config.iterations, record)
    return history


@register_method(
    "ca", "CA (Ablating Concepts): fine-tune the target's prediction onto an anchor concept's, on the model's own anchor images.",
    # toy: CA's erasure is a cliff in lr on the toy world (seed 0, 8 images/class: lr 2e-5 ESR-1 6 %, 3e-5 75 %, 4e-5 100 % at
    # PSR-1 42 %, 1e-4 100 % at 17 %); 4e-5 is the smallest that erases, 20x the paper's 2e-6 for a 3 M-parameter model
    CAConfig, {"toy": {"lr": 4e-5, "anchor_images": 64, "ddim_steps": 20, "iterations": 150}, "fast": {"anchor_images": 64, "ddim_steps": 25},
             "tiny": {"iterations": 2, "anchor_images": 2, "ddim_steps": 3, "batch_size": 2, "lr": 1e-3}},
    families=ALL_FAMILIES,
)
def fit_ca(pipe: Pipeline, request: ErasureRequest, config: CAConfig, progress: Progress | None) -> ErasureResult:
    """Generate anchor images, then train the target prompts' predictions onto the anchor's; the pipeline is left unchanged."""
    started = time.perf_counter()
    targets = [check_prompt(pipe, t, "concept") for t in request.targets]
    anchor = config.anchor.strip()
    if anchor:
        check_prompt(pipe, anchor, "anchor")
    if anchor.lower() in {t.lower() for t in targets}:
        raise ErasekitError(f"the anchor {anchor!r} is the concept being erased; choose a different anchor (e.g. its superclass) or '' for the empty prompt")
    templates = load_templates(config.templates)
    family = family_of(pipe)
    unet = family.denoiser(pipe)
    prefix = "unet" if hasattr(pipe, "unet") else "transformer"
    params = ca_parameters(family, unet, config.train_method, config.kv_only)
    generator = torch.Generator().manual_seed(config.seed)
    base_hash = request.base_hash or weights_hash(pipe)
    # image i: template i mod T; its target prompt names target i mod N in the same template (the reference swaps the word)
    picks = [(i % len(templates), i % len(targets)) for i in range(config.anchor_images)]
    anchor_prompts = [fill(templates[k], anchor) for k, _ in picks]
    target_prompts = [fill(templates[k], targets[j]) for k, j in picks]
    for prompt in set(target_prompts):
        check_prompt(pipe, prompt, "target prompt")
    setup_started = time.perf_counter()
    latents = anchor_latents(pipe, anchor_prompts, config, generator)
    emb_anchor, emb_target = encode_cond(pipe, anchor_prompts), encode_cond(pipe, target_prompts)
    schedule = family.schedule(pipe, config.ddim_steps)
    generation_s = time.perf_counter() - setup_started
    unet.requires_grad_(False)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if isinstance(getattr(pipe, name, None), nn.Module):
            getattr(pipe, name).requires_grad_(False)
    originals = {n: p.detach().clone() for n, p in params.items()}
    try:
        history = ablate(family, unet, params, latents, emb_target, emb_anchor, schedule, config, generator, progress)
        delta = {f"{prefix}.{n}": p.detach().to("cpu").clone().contiguous() for n, p in params.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(originals[n])
        unet.requires_grad_(False)
    # CA has no preserve list (its prior preservation uses the anchor); the request's list is recorded, not used
    return make_result(
        pipe, dataclasses.replace(request, base_hash=base_hash), "ca", config, delta, concepts=tuple(targets), preserve=(),
        history=([{"anchor": anchor, "anchor_prompts": sorted(set(anchor_prompts)), "unused_preserve": list(request.preserve)}, *history]),
        timings={"generation_s": round(generation_s, 3), "total_s": round(time.perf_counter() - started, 3)},
    )
