"""Co-Erasing (Li et al., ICML 2025): ESD's text erasure, then the same negative guidance with the concept's *images* as prompts.

Stage 1 is ESD on the text prompt. Stage 2 starts from it and keeps it as the frozen reference: the model is
prompted with the text *and* an image of the concept through an image-prompt adapter (IP-Adapter), and trained
toward the negatively guided prediction of the stage-1 model, so the concept cannot come back through the image
side either:
    eps_theta(z, c + i) -> u - eta (eps_1(z, c + i) - u),   u = eps_1(z, '') (``text_uncond``) or eps_1(z, '' + i),
z the trained model's own rollout under the text prompt to a random step (blurred, as the reference does). The
images are ``image_count`` generations of the original model under the target prompt (the reference: 100), or a
folder. Text-guided refinement (``text_guide``) keeps of each image only what the prompt names: the image tokens
attend over the prompt's text states and are replaced by that mix (see :func:`erasekit.image_prompt.text_guided`).
The adapter is loaded for stage 2 only and taken off after; the delta holds the UNet's own weights.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F

from erasekit import image_prompt as ip
from erasekit.concepts import check_prompt
from erasekit.errors import ErasekitError
from erasekit.families import Cond, family_of
from erasekit.families.base import Pipeline
from erasekit.methods import checkpoint as ckpt
from erasekit.methods.base import ErasureRequest, Progress, TrainConfig, check_stages, esd_target, make_result
from erasekit.methods.closed_form import applied
from erasekit.methods.loop import finetune
from erasekit.methods.trainer import Setup, prepare, train
from erasekit.models import weights_hash
from erasekit.result import ErasureResult

STAGE1_METHODS = ("co-erasing", "esd-x", "esd-u")


@dataclass
class CoErasingConfig(TrainConfig):
    """Co-Erasing settings; defaults are the reference's (Ferry-Li/Co-Erasing: main.py and train.sh for nudity)."""

    stage: str = field(default="both", metadata={"help": "both, 1 (ESD's text erasure alone) or 2 (image erasure on a stage-1 result, see stage1)."})
    stage1: str = field(default="", metadata={"help": "Stage 2 alone: the stage-1 delta to build on (a co-erasing stage 1, or an esd-x / esd-u result)."})
    train_method: str = field(default="noxattn", metadata={"help": "Parameters both stages train (Co-Erasing for nudity: noxattn)."})
    stage1_iterations: int = field(default=1000, metadata={"help": "Stage-1 (text) steps (Co-Erasing: 1000); iterations counts stage 2's."})
    start_guidance: float = field(default=1.0, metadata={"help": "CFG of the rollouts (Co-Erasing rolls out with the text prompt alone: 1)."})
    images: str = field(default="", metadata={"help": "A folder of the concept's images; '' = generate image_count of them with the original model."})
    image_count: int = field(default=100, metadata={"help": "Images of the concept to erase through (Co-Erasing: 100)."})
    image_steps: int = field(default=25, metadata={"help": "Sampler steps of the generated images."})
    image_guidance: float = field(default=7.5, metadata={"help": "CFG scale of the generated images."})
    adapter: str = field(default="", metadata={"help": "The IP-Adapter folder (weights and image_encoder/); '' = the toy model's own."})
    text_guide: bool = field(default=True, metadata={"help": "Text-guided refinement of the image tokens by the target prompt (Co-Erasing: on)."})
    text_uncond: bool = field(default=True, metadata={"help": "The unconditional branch is the empty text without the image (Co-Erasing's --text_uncond)."})
    blur: int = field(default=3, metadata={"help": "Gaussian blur kernel on the rollout latent (Co-Erasing: 3; 0 = none)."})
    noise_factor: float = field(default=0.0, metadata={"help": "Uniform noise added to the image tokens (Co-Erasing: 0)."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        from erasekit.checks import MAX_GUIDANCE, MAX_ITERATIONS, MAX_SCALE, check_between

        check_stages(self.stage, self.stage1, "the text erasure of stage 1", "a co-erasing stage-1, esd-x or esd-u delta")
        if self.train_method == "lora":
            raise ErasekitError("co-erasing trains the UNet's own weights in both stages; choose train_method noxattn, xattn, selfattn or full")
        check_between("stage1_iterations", self.stage1_iterations, 1, MAX_ITERATIONS)
        check_between("image_count", self.image_count, 1, 10_000)
        check_between("image_steps", self.image_steps, 1, 1000)
        check_between("image_guidance", self.image_guidance, 0.0, MAX_GUIDANCE)
        check_between("noise_factor", self.noise_factor, 0.0, MAX_SCALE)
        if self.blur < 0 or (self.blur and self.blur % 2 == 0) or self.blur > 31:
            raise ErasekitError(f"blur must be 0 (none) or an odd kernel size up to 31, got {self.blur}")


def blur(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """A Gaussian blur of each latent channel (reflect padding; sigma as torchvision picks it for the kernel size)."""
    if kernel <= 1:
        return x
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    r = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.dtype)
    w = (g[:, None] * g[None, :]).expand(x.shape[1], 1, kernel, kernel).to(x.device)
    return F.conv2d(F.pad(x, [kernel // 2] * 4, mode="reflect"), w, groups=x.shape[1])


def concept_images(pipe: Pipeline, config: CoErasingConfig, targets: list[str]) -> list[Any]:
    """The images stage 2 erases through: the folder's, or the original model's own under the target prompts."""
    if config.images:
        from pathlib import Path

        folder = Path(config.images)
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if folder.is_dir() else []
        if not files:
            raise ErasekitError(f"no PNG or JPEG images in {config.images}; pass a folder of the concept's images, or images='' to generate them")
        return ip.load_images(files[: config.image_count])
    from erasekit.sampling import generate

    prompts = [targets[i % len(targets)] for i in range(config.image_count)]
    seeds = [config.seed * 1_000_003 + 500_000 + i for i in range(config.image_count)]
    return list(generate(pipe, prompts, seeds, steps=config.image_steps, guidance=config.image_guidance))


def _weights(pipe: Pipeline, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a weights delta (``unet.*`` keys) into the denoiser; returns what it replaced, keyed the same way."""
    family = family_of(pipe)
    prefix = family.prefix + "."
    with torch.no_grad():
        previous = applied(family.denoiser(pipe), {k.removeprefix(prefix): v for k, v in delta.items()})
    return {prefix + k: v for k, v in previous.items()}


def _stage1_from(path: str, base_hash: str) -> ErasureResult:
    from erasekit.result import load_result

    earlier = load_result(path)
    if earlier.method not in STAGE1_METHODS or (earlier.method == "co-erasing" and earlier.config.get("stage") != "1") or earlier.kind != "weights":
        raise ErasekitError(f"{path} is a {earlier.method} result, not a text erasure stage 2 can build on; run `erasekit erase --method co-erasing --set stage=1` (or esd-x / esd-u) first")
    if earlier.base_hash != base_hash:
        raise ErasekitError(f"{path} was made on another base model; run stage 1 on this model first")
    return earlier


def _sub(request: ErasureRequest, name: str) -> ErasureRequest:
    """The request with its checkpoint in a stage's own subfolder (stage both checkpoints each stage apart)."""
    spec = request.checkpoint
    return request if spec is None else dataclasses.replace(request, checkpoint=ckpt.CheckpointSpec(spec.folder / name, spec.every))


def stage2_loop(s: Setup[CoErasingConfig], tokens: torch.Tensor, progress: Progress | None) -> None:
    """Stage 2's steps from ``s.done``: per batch entry a target, an image, a rollout point; the negatively guided target."""
    cfg, tr = s.config, s.trainable
    for step in range(s.done, cfg.iterations):
        s.between_steps = False
        losses = []
        for _ in range(cfg.batch_size):
            j = int(torch.randint(len(s.targets), (1,), generator=s.generator))
            i = int(torch.randint(len(tokens), (1,), generator=s.generator))
            level = s.schedule.draw(s.generator)
            start = s.family.start_noise(s.pipe, s.generator).to(tr.device)
            text = s.emb_targets[j]
            with torch.no_grad():
                x = blur(s.schedule.rollout(tr.eps, start, text, s.uncond, [level.steps], cfg.start_guidance)[0], cfg.blur)
            image = tokens[i : i + 1].to(tr.device)
            if cfg.text_guide:
                image = ip.text_guided(image, text.parts["hidden"])
            if cfg.noise_factor:
                image = image + cfg.noise_factor * torch.rand(image.shape, generator=s.generator).to(image.device)
            both = Cond({"hidden": text.parts["hidden"], ip.PART: image})
            null = Cond({"hidden": s.emb_null.parts["hidden"], ip.PART: ip.no_image(image) if cfg.text_uncond else image})
            t = torch.full((1,), level.t, device=tr.device)
            frozen = tr.frozen_eps(torch.cat([x, x]), t.expand(2), Cond.cat([null, both])).float()
            pred = tr.eps(x, t, both).float()
            losses.append(F.mse_loss(pred, esd_target(frozen[:1], frozen[1:], cfg.negative_guidance)))
        loss = torch.stack(losses).mean()
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        s.end_step(step + 1, {"step": step + 1, "erase_loss": round(loss.item(), 6), "images": len(tokens)}, loss.detach(), torch.zeros(()), None, progress)


def fit_co_erasing(pipe: Pipeline, request: ErasureRequest, config: CoErasingConfig, progress: Progress | None) -> ErasureResult:
    """Co-Erasing's stages as configured; the pipeline is left unchanged (and without the adapter)."""
    started = time.perf_counter()
    family = family_of(pipe)
    if family.name != "sd":
        raise ErasekitError(f"co-erasing prompts the model with images through an IP-Adapter, which erasekit loads for SD 1.x/2.x; the {family.label} family is not supported (use esd-x)")
    targets = [check_prompt(pipe, t, "concept") for t in request.targets]
    base_hash = request.base_hash or weights_hash(pipe)
    request = dataclasses.replace(request, base_hash=base_hash)
    folder = ip.adapter_source(str(pipe.config.get("_name_or_path", "")), config.adapter or None)
    if config.stage != "1" and folder is None:
        raise ErasekitError("co-erasing's stage 2 needs an image adapter for this model; pass --set adapter=FOLDER (an IP-Adapter with its image_encoder/)")
    one = dataclasses.replace(config, iterations=config.stage1_iterations)
    if config.stage == "1":
        stage1 = finetune(pipe, request, one, progress, method="co-erasing", loss_space="eps")
        return dataclasses.replace(stage1, config={**stage1.config, "iterations": config.iterations})
    images = concept_images(pipe, config, targets)  # by the original model, as the reference's data
    if config.stage == "2":
        stage1 = _stage1_from(config.stage1, base_hash)
    else:  # stage 2 still reads the text encoder: stage 1 must not release it
        stage1 = finetune(pipe, dataclasses.replace(_sub(request, "stage1"), release_unused=False), one, progress, method="co-erasing", loss_space="eps")
    previous = _weights(pipe, stage1.weights)
    attached = not ip.has_adapter(pipe)
    try:
        if attached:
            assert folder is not None
            ip.attach_adapter(pipe, folder)
        tokens = ip.image_tokens(pipe, images).float()
        s = cast(Setup[CoErasingConfig], prepare(pipe, request, config))
        s.history.append({"stage": 2, "images": len(images), "stage1": config.stage1 or "this run"})
        second = train(s, _sub(request, "stage2") if config.stage == "both" else request, "co-erasing",
                       lambda s, progress: stage2_loop(s, tokens, progress), None, 1, progress)
    finally:
        if attached and ip.has_adapter(pipe):
            pipe.unload_ip_adapter()
        _weights(pipe, previous)
    # stage 1's steps are kept as stage1_step: "step" counts the image steps, the run's iterations
    first = [{("stage1_step" if k == "step" else k): v for k, v in h.items()} for h in stage1.history] if config.stage == "both" else []
    history = [*first, *second.history]
    timings = {"stage1_s": stage1.timings.get("total_s", 0.0) if config.stage == "both" else 0.0, "total_s": round(time.perf_counter() - started, 3)}
    return make_result(pipe, request, "co-erasing", config, {**stage1.weights, **second.weights}, "weights", history, timings,
                       tuple(targets), tuple(request.preserve))
