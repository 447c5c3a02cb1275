"""DoCo, concept domain correction (Wu et al., AAAI 2025): the target's outputs are made indistinguishable from an anchor's.

Built on CA's data (the model's own anchor images, target prompts that swap the anchor word for the target). Per step:
an anchor latent is noised at t ~ U[0, T); the frozen model's x0 under the anchor prompt is "anchor" (label 0) and the
trained model's x0 under the target prompt is "target" (label 1) for a small patch discriminator (BCE). The denoiser's
cross-attention keys/values are trained to make its target x0 read as anchor (BCE toward 0), and a prior-preservation
loss MSE(eps_theta(x_t', anchor prompt), eps) keeps the anchor itself. The two gradients are each clipped to norm 1,
then, per weight tensor, the part of the erasure gradient that conflicts with the preservation gradient is projected
out (gradient surgery); the step follows the corrected erasure gradient alone, as the reference does. The first
``warm_up`` iterations train the discriminator only.

Reference deviations, on purpose: the generator's loss does not leak into the discriminator's gradient (the reference's
does); ``surgery=project`` removes the conflicting component exactly (PCGrad); ``surgery=reference`` keeps the
reference's g_a - c g_p / |g_p| (c the cosine), which equals it only where |g_a| = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.families import Family, Level, family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress
from erasekit.methods.ca import Anchors, ca_data, ca_setup
from erasekit.methods.checkpoint import load_optimizer_tensors, optimizer_tensors
from erasekit.methods.trainer import Setup, train
from erasekit.result import ErasureResult

SURGERY = ("project", "reference", "off")


@dataclass
class DoCoConfig(MethodConfig):
    """DoCo settings; defaults are the reference's (yongliang-wu/DoCo, README commands and train.py) for objects and nudity."""

    iterations: int = field(default=2000, metadata={"help": "Iterations, warm-up included (DoCo: 2000)."})
    warm_up: int = field(default=1000, metadata={"help": "First iterations that train the discriminator alone (DoCo: 1000)."})
    lr: float = field(default=6e-6, metadata={"help": "Denoiser learning rate per sample; AdamW runs at lr x batch_size (DoCo: 6e-6, scaled as CA's scale_lr)."})
    disc_lr: float = field(default=1e-4, metadata={"help": "Discriminator Adam learning rate (DoCo: 1e-4 objects and nudity, 5e-4 styles)."})
    disc_width: int = field(default=64, metadata={"help": "Channels of the discriminator's first layer, doubled per layer (DoCo's PatchGAN: 64)."})
    batch_size: int = field(default=8, metadata={"help": "Anchor latents per step, and as many for the prior loss (DoCo: 8)."})
    anchor: str = field(default="", metadata={"help": "Anchor concept the target's domain is moved to (DoCo: 'airplane' for parachute, 'clothed' for nudity); '' = the empty prompt; "
                                                   "'toy' = square (triangle where square or diamond is erased), the toy preset's."})
    prior_weight: float = field(default=1.0, metadata={"help": "Weight of the prior-preservation loss where surgery is off (DoCo: 1)."})
    surgery: str = field(default="project", metadata={"help": "Gradient surgery: project (remove the erasure gradient's conflicting part), reference (DoCo's formula), off (plain sum)."})
    surgery_scale: float = field(default=1.0, metadata={"help": "lambda: how much of the conflicting part is removed (DoCo: 1)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Each gradient (erasure, preservation) is clipped to this norm first (DoCo: 1)."})
    train_method: str = field(default="xattn", metadata={"help": "Parameter set (DoCo: cross-attention); kv_only narrows it to attn2.to_k/to_v."})
    kv_only: bool = field(default=True, metadata={"help": "Train only the cross-attention keys/values (DoCo's 'cross-attn')."})
    anchor_images: int = field(default=1000, metadata={"help": "Anchor images the pipeline generates first (DoCo: 1000)."})
    templates: str = field(default="", metadata={"help": "File of prompt templates with {concept} (and {article}); empty = CA's built-in ones."})
    ddim_steps: int = field(default=25, metadata={"help": "Sampler steps of the anchor images (DoCo: 25)."})
    guidance: float = field(default=6.0, metadata={"help": "CFG scale of the anchor images (DoCo: 6)."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay of the denoiser (DoCo: 1e-2)."})
    precision: str = field(default="fp32", metadata={"help": "fp32 only (the discriminator game runs in fp32)."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        from erasekit.checks import MAX_GUIDANCE, MAX_ITERATIONS, MAX_LR, MAX_WEIGHT, check_between

        for name in ("iterations", "batch_size", "anchor_images"):
            check_between(name, getattr(self, name), 1, MAX_ITERATIONS)
        check_between("warm_up", self.warm_up, 0, self.iterations - 1, why="the iterations that follow it train the denoiser")
        check_between("disc_width", self.disc_width, 1, 1024)
        check_between("ddim_steps", self.ddim_steps, 1, 1000, why="the training timesteps")
        check_between("lr", self.lr, 0.0, MAX_LR, low_open=True, why="per sample; DoCo uses 6e-6")
        check_between("disc_lr", self.disc_lr, 0.0, MAX_LR, low_open=True, why="DoCo uses 1e-4 to 5e-4")
        check_between("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        check_between("prior_weight", self.prior_weight, 0.0, MAX_WEIGHT)
        check_between("surgery_scale", self.surgery_scale, 0.0, 1.0, why="the share of the conflicting part removed")
        check_between("max_grad_norm", self.max_grad_norm, 0.0, 1e6, low_open=True)
        check_between("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.surgery not in SURGERY:
            raise ErasekitError(f"unknown surgery {self.surgery!r}; choose one of: {', '.join(SURGERY)}")
        if self.precision != "fp32":
            raise ErasekitError("doco runs in fp32 (its discriminator game); drop --precision")
        if self.train_method == "lora":
            raise ErasekitError("doco trains weights directly; train_method must be xattn, full, selfattn or noxattn")


class PatchDiscriminator(nn.Module):
    """DoCo's PatchGAN on latents: stride-2 convolutions (kernel 4, LeakyReLU 0.2, BatchNorm after the first), then a 1-channel map.

    The reference's four halvings suit SD's 64 x 64 latents; smaller latents get as many as leave a 2 x 2 map.
    """

    def __init__(self, channels: int, size: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c_out, side = channels, width, size
        for i in range(4):
            if side < 4:
                break
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1)] + ([nn.BatchNorm2d(c_out)] if i else []) + [nn.LeakyReLU(0.2)]
            c_in, c_out, side = c_out, c_out * 2, side // 2
        layers.append(nn.Conv2d(c_in, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits (B x 1 x h x w)."""
        return self.net(x)


class Discriminator:
    """The discriminator, its Adam and what identifies its run; checkpointed with the denoiser (``state``/``load_state``)."""

    def __init__(self, shape: tuple[int, ...], config: DoCoConfig, base_hash: str, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> None:
        channels, size = shape[0], shape[-1]
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):  # its initialisation follows the run's seed; the global RNG is left as it was
            torch.manual_seed(seed)
            self.net = PatchDiscriminator(channels, size, config.disc_width).to(device)  # initialised on the CPU: the same on any device
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.disc_lr, betas=(0.5, 0.999))
        self.identity = {"base_hash": base_hash, "shape": list(shape), "width": config.disc_width}
        self.last_loss = 0.0

    def loss(self, anchor_x0: torch.Tensor, target_x0: torch.Tensor) -> torch.Tensor:
        """BCE with anchor = 0, target = 1 (the reference's labels), on detached inputs."""
        a, t = self.net(anchor_x0.detach()), self.net(target_x0.detach())
        return F.binary_cross_entropy_with_logits(a, torch.zeros_like(a)) + F.binary_cross_entropy_with_logits(t, torch.ones_like(t))

    def step(self, anchor_x0: torch.Tensor, target_x0: torch.Tensor) -> float:
        """One discriminator update; returns its loss."""
        self.net.train()
        loss = self.loss(anchor_x0, target_x0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.item()
        return self.last_loss

    def fool_loss(self, target_x0: torch.Tensor) -> torch.Tensor:
        """The denoiser's adversarial loss: its target x0 judged as anchor (label 0); no gradient reaches the discriminator."""
        for p in self.net.parameters():
            p.requires_grad_(False)
        try:
            logits = self.net(target_x0)
        finally:
            for p in self.net.parameters():
                p.requires_grad_(True)
        return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON for a checkpoint."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        opt, groups = optimizer_tensors(self.optimizer, "opt")
        return {**tensors, **opt}, {"identity": self.identity, "opt_groups": groups}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore from a checkpoint, refusing one from another run's discriminator."""
        if meta.get("identity") != self.identity:
            raise ErasekitError(f"the checkpoint's discriminator belongs to another run ({meta.get('identity')} here {self.identity}); delete the checkpoint or resume the run that wrote it")
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        load_optimizer_tensors(self.optimizer, tensors, "opt", meta["opt_groups"])

    def summary(self) -> dict[str, Any]:
        """The final state, for the history."""
        return {"discriminator_loss": round(self.last_loss, 6), "parameters": sum(p.numel() for p in self.net.parameters())}


def x0_of(schedule: Any, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latent each sample's output implies at its own timestep (the reference's batched DDPM step)."""
    rows = [schedule.to_x0(x_t[i : i + 1], out[i : i + 1], Level(0, 0, float(t[i]), float(t[i]))) for i in range(len(x_t))]
    return torch.cat(rows)


def _clipped(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    norm = float(torch.stack([g.float().pow(2).sum() for g in grads]).sum().sqrt())
    scale = min(1.0, max_norm / (norm + 1e-6))
    return [g * scale for g in grads]


def surgery(g_erase: list[torch.Tensor], g_keep: list[torch.Tensor], mode: str, scale: float) -> tuple[list[torch.Tensor], int]:
    """Per tensor, remove the part of the erasure gradient that points against the preservation gradient; (result, conflicts)."""
    out, conflicts = [], 0
    for ge, gk in zip(g_erase, g_keep):
        dot = float((ge * gk).sum())
        nk = float(gk.norm())
        if dot >= 0 or nk == 0:
            out.append(ge)
            continue
        conflicts += 1
        if mode == "project":
            out.append(ge - scale * dot / nk**2 * gk)
        else:  # the reference: g_a - lambda cos(g_a, g_k) g_k / |g_k|
            cos = dot / (float(ge.norm()) * nk + 1e-12)
            out.append(ge - scale * cos * gk / nk)
    return out, conflicts


def doco_step(s: Setup[DoCoConfig], data: Anchors, disc: Discriminator, step: int) -> dict[str, Any]:
    """One iteration: the discriminator's update, then (after warm-up) the denoiser's; its record."""
    cfg, tr, schedule, latents = s.config, s.trainable, s.schedule, data.latents
    idx = torch.randint(len(latents), (cfg.batch_size,), generator=s.generator)
    x_t, t, _ = schedule.noised(latents[idx], s.generator)
    prior_idx = torch.randint(len(latents), (cfg.batch_size,), generator=s.generator)
    x_p, t_p, noise_p = schedule.noised(latents[prior_idx], s.generator)
    with torch.no_grad():
        anchor_x0 = x0_of(schedule, x_t, tr.frozen_eps(x_t, t, data.emb_anchor[idx]), t)
    training = step >= cfg.warm_up
    with torch.set_grad_enabled(training):
        target_x0 = x0_of(schedule, x_t, tr.eps(x_t, t, data.emb_target[idx]), t)
    record: dict[str, Any] = {"step": step + 1, "disc_loss": round(disc.step(anchor_x0, target_x0), 6)}
    if not training:
        record.update(erase_loss=0.0, preserve_loss=0.0)
        return record
    params = list(tr.params.values())
    erase = disc.fool_loss(target_x0)
    prior = F.mse_loss(tr.eps(x_p, t_p, data.emb_anchor[prior_idx]).float(), noise_p.float())
    g_erase = _clipped(list(torch.autograd.grad(erase, params)), cfg.max_grad_norm)
    g_keep = _clipped(list(torch.autograd.grad(prior, params)), cfg.max_grad_norm)
    if cfg.surgery == "off":
        grads, conflicts = [ge + cfg.prior_weight * gk for ge, gk in zip(g_erase, g_keep)], 0
    else:
        grads, conflicts = surgery(g_erase, g_keep, cfg.surgery, cfg.surgery_scale)
    s.optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype)
    s.optimizer.step()
    record.update(erase_loss=round(erase.item(), 6), preserve_loss=round(prior.item(), 6), conflicts=conflicts)
    return record


def doco_loop(s: Setup[DoCoConfig], data: Anchors, disc: Discriminator, progress: Progress | None) -> None:
    """DoCo's iterations from ``s.done`` on; every iteration is a boundary (weights, both optimisers and the RNG carry over)."""
    for step in range(s.done, s.config.iterations):
        s.between_steps = False
        record = doco_step(s, data, disc, step)
        s.end_step(step + 1, record, torch.tensor(record["erase_loss"]), torch.tensor(record["preserve_loss"]), disc, progress)


def _family_for(pipe: Pipeline) -> Family:
    family = family_of(pipe)
    if len(family.latent_shape(pipe)) != 4:
        raise ErasekitError(f"doco's discriminator reads image-shaped latents; the {family.name} family packs its latents into a sequence (use esd-x or eap there)")
    return family


def fit_doco(pipe: Pipeline, request: ErasureRequest, config: DoCoConfig, progress: Progress | None) -> ErasureResult:
    """Generate anchor images, then play DoCo's game on the cross-attention; the pipeline is left unchanged."""
    _family_for(pipe)
    s, anchor_prompts, target_prompts = ca_setup(pipe, request, config)
    try:
        disc = Discriminator(tuple(s.family.latent_shape(pipe)[1:]), config, s.base_hash, s.generator, s.trainable.device)
    except BaseException:
        s.trainable.restore()
        raise
    data = ca_data(s, anchor_prompts, target_prompts)
    return train(s, request, "doco", lambda s, progress: doco_loop(s, data, disc, progress), disc, 1, progress)
