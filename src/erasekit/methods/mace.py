"""MACE, mass concept erasure (Lu et al., CVPR 2024, arXiv 2403.06135), implemented from the paper alone.

1. *Closed-form refinement*: in a prompt that names the concept, the words after it carry some of it (a causal text
   encoder mixes it into them). Every cross-attention key/value map is edited (UCE's closed form) so those rows
   read as the same rows of the prompt with the concept replaced by ``anchor``, the retain prompts' rows kept.
2. *One LoRA per concept*: on the refined model, a rank-``lora_rank`` LoRA on the cross-attention keys and values is
   trained to drive the concept tokens' attention inside the concept's region to zero (the squared attention
   probabilities under the mask, every cross-attention layer), on images of the concept with masks: rendered by
   the toy world (its renderer knows each object's pixels) or a user's folder (``<name>_mask.png`` beside each image).
   Two stated options widen the loss beyond the paper's: ``tokens="word+after"`` also suppresses every later token
   (a causal encoder fills them with the concept) and ``region="image"`` acts on every pixel; the toy preset uses
   both, because the paper's loss left the toy world's circles drawn (the sweep is in ``catalog.py``).
3. *Closed-form fusion*: one update W* of each key/value map that, on each concept's prompts, acts as that concept's
   refined-plus-LoRA map, and on the retain prompts as the refined map (:func:`erasekit.methods.mace_parts.fuse`),
   so tens of concepts erase at once without their LoRAs interfering.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasekit.errors import ErasekitError, SettingError
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress, make_result
from erasekit.result import ErasureResult

REFINE_TEMPLATES = ("an image of a {}", "a picture of a {} in colour", "a {} drawn on a page", "a photo of a {}, centred")
TRAIN_TEMPLATES = ("an image of a {}", "a picture of a {}", "a photo of a {}")
LORA_MODULES = ["attn2.to_k", "attn2.to_v"]


@dataclass
class MACEConfig(MethodConfig):
    """MACE: closed-form refinement, one attention-map LoRA per concept, closed-form fusion (Lu et al., CVPR 2024)."""

    anchor: str = field(default="", metadata={"help": "Word that stands in for a concept in the refinement's target prompts (MACE: a super-category such as 'object'; empty: dropped)."})
    refine: bool = field(default=True, metadata={"help": "Run the closed-form refinement first."})
    lam: float = field(default=0.5, metadata={"help": "Refinement's pull toward the original maps (UCE's lambda)."})
    preserve_scale: float = field(default=1.0, metadata={"help": "Refinement's weight on the retain prompts' rows."})
    retain_prompts: str = field(default="coco", metadata={"help": "Prompts whose rows refinement and fusion keep: coco, toy (the toy world's captions without the concepts), or a text file."})
    images: str = field(default="", metadata={"help": "Folder of concept images with <name>_mask.png masks (one subfolder per concept when several); toy (or empty on the toy model): the toy world's renders."})
    n_images: int = field(default=8, metadata={"help": "Rendered images per concept when no folder is given (MACE: 8)."})
    iterations: int = field(default=50, metadata={"help": "LoRA steps per concept (our default)."})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of each LoRA (our default)."})
    lora_rank: int = field(default=1, metadata={"help": "Rank of each concept's LoRA (MACE: 1)."})
    batch_size: int = field(default=2, metadata={"help": "Images per LoRA step."})
    region: str = field(default="mask", metadata={"help": "Where the attention loss acts: mask (MACE: the concept's pixels) or image (every pixel, the masks unused)."})
    tokens: str = field(default="word", metadata={"help": "Tokens whose attention the LoRA suppresses: word (MACE: the concept's own tokens) or word+after (also every later token, which a causal encoder fills with the concept)."})
    fusion_scale: float = field(default=1.0, metadata={"help": "Fusion's weight on the retain prompts' rows against the concepts'."})
    precision: str = field(default="fp32", metadata={"help": "fp32 only for now."})
    train_method: str = field(default="xattn", metadata={"help": "Parameters MACE changes: only xattn (the cross-attention keys and values, attn2.to_k/to_v)."})

    def validate(self) -> None:
        """One-line refusals of values that cannot run."""
        from erasekit.checks import MAX_ITERATIONS, MAX_LORA_RANK, MAX_LR, check_between

        super().validate()
        check_between("lam", self.lam, 1e-6, 1e6, why="UCE's regulariser")
        check_between("preserve_scale", self.preserve_scale, 0.0, 1e6)
        check_between("fusion_scale", self.fusion_scale, 0.0, 1e6)
        check_between("n_images", self.n_images, 1, 10_000)
        check_between("iterations", self.iterations, 1, MAX_ITERATIONS)
        check_between("lr", self.lr, 0.0, MAX_LR, low_open=True, why="Adam's step")
        check_between("lora_rank", self.lora_rank, 1, MAX_LORA_RANK)
        check_between("batch_size", self.batch_size, 1, 1024)
        if self.region not in ("mask", "image"):
            raise SettingError("region", f"{{name}} must be mask or image, got {self.region!r}")
        if self.tokens not in ("word", "word+after"):
            raise SettingError("tokens", f"{{name}} must be word or word+after, got {self.tokens!r}")
        if self.train_method != "xattn":
            raise SettingError("train_method", f"mace edits only the cross-attention keys and values (attn2.to_k/to_v); {{name}} {self.train_method!r} is not possible, use xattn")
        if self.precision != "fp32":
            raise SettingError("precision", f"{{name}} {self.precision!r} is not supported by mace; use fp32")


def word_span(tokenizer: Any, template: str, word: str) -> tuple[int, int]:
    """Token positions [first, last + 1) of ``word`` in ``template.format(word)`` (BOS at 0); an empty word spans nothing."""
    before = template.split("{}")[0].strip()
    start = 1 + (len(tokenizer(before, add_special_tokens=False).input_ids) if before else 0)
    return start, start + (len(tokenizer(word, add_special_tokens=False).input_ids) if word else 0)


def refinement_rows(pipe: Pipeline, concepts: tuple[str, ...], anchor: str, retain: list[str]) -> Any:
    """The refinement's rows: each concept prompt's rows after the concept, aligned with the anchor prompt's rows after the anchor."""
    from erasekit.concepts import encode
    from erasekit.methods.closed_form import EditRows
    from erasekit.methods.realera import through_eos

    keys, guides = [], []
    for concept in concepts:
        own = encode(pipe, [t.format(concept) for t in REFINE_TEMPLATES]).to(dtype=torch.float64, device="cpu")
        swapped = encode(pipe, [" ".join(t.format(anchor).split()) for t in REFINE_TEMPLATES]).to(dtype=torch.float64, device="cpu")
        for t, h, g in zip(REFINE_TEMPLATES, own, swapped):
            k, a = through_eos(h, word_span(pipe.tokenizer, t, concept)[1], g, word_span(pipe.tokenizer, t, anchor)[1])
            keys.append(k)
            guides.append(a)
    keep = encode(pipe, [*retain, ""]).to(dtype=torch.float64, device="cpu").flatten(0, 1)
    return EditRows(torch.cat(keys), torch.cat(guides), keep)


def concept_data(pipe: Pipeline, concept: str, config: MACEConfig, several: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, masks) of one concept's images: the VAE's latents of the images and their masks (B x H x W in [0, 1])."""
    from erasekit.methods.mace_parts import folder_images, toy_images
    from erasekit.models import model_id

    if config.images == "toy" or (not config.images and model_id(pipe) == "toy"):
        images, masks = toy_images(concept, config.n_images, config.seed)
    elif config.images:
        folder = Path(config.images) / concept if several else Path(config.images)
        images, masks = folder_images(folder)
    else:
        raise SettingError("images", "mace needs images of the concept with masks on this model: pass {name} DIR (each image with a <name>_mask.png beside it)")
    size = int(pipe.vae.config.sample_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        vae = pipe.vae
        latents = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    return latents.float(), torch.from_numpy(np.ascontiguousarray(masks)).float().to(latents.device)


def train_lora(pipe: Pipeline, concept: str, latents: torch.Tensor, masks: torch.Tensor, config: MACEConfig, generator: torch.Generator,
               report: Any) -> dict[str, torch.Tensor]:
    """Train one concept's LoRA on the attention loss; return its update of each key/value map (``<module>.weight`` -> dW)."""
    from erasekit.concepts import encode
    from erasekit.methods.mace_parts import attention_loss, probed
    from erasekit.models import LORA_ADAPTER, add_lora, remove_lora

    unet, scheduler = pipe.unet, pipe.scheduler
    prompts = [t.format(concept) for t in TRAIN_TEMPLATES]
    conds = encode(pipe, prompts).to(latents.device)
    spans = [list(range(*word_span(pipe.tokenizer, t, concept))) for t in TRAIN_TEMPLATES]
    if config.tokens == "word+after":
        spans = [list(range(span[0], conds.shape[1])) for span in spans]
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        params = add_lora(unet, config.lora_rank, LORA_MODULES)
    try:
        optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)
        for step in range(config.iterations):
            picks = torch.randint(len(latents), (config.batch_size,), generator=generator)
            p = int(torch.randint(len(prompts), (1,), generator=generator))
            t = torch.randint(int(scheduler.config.num_train_timesteps), (config.batch_size,), generator=generator)
            noise = torch.randn(latents[picks].shape, generator=generator).to(latents.device)
            x_t = scheduler.add_noise(latents[picks], noise, t.to(latents.device))
            store: list[tuple[torch.Tensor, int]] = []
            with probed(unet, store):
                unet(x_t, t.to(latents.device), encoder_hidden_states=conds[p : p + 1].expand(config.batch_size, -1, -1))
            loss = attention_loss(store, spans[p], masks[picks] if config.region == "mask" else torch.ones_like(masks[picks]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not torch.isfinite(loss):
                raise ErasekitError(f"mace's attention loss became {loss.item():.3g} at step {step + 1} of {concept!r}; lower --lr and run again")
            report(concept, step + 1, float(loss.detach()))
        updates = {}
        for name, module in unet.named_modules():
            if hasattr(module, "get_delta_weight") and LORA_ADAPTER in getattr(module, "lora_A", {}):
                updates[f"{name}.weight"] = module.get_delta_weight(LORA_ADAPTER).detach().to(torch.float64).cpu()
        return updates
    finally:
        remove_lora(unet)


def fit_mace(pipe: Pipeline, request: ErasureRequest, config: MACEConfig, progress: Progress | None) -> ErasureResult:
    """Refine in closed form, train one attention LoRA per concept, fuse them into one update of the key/value maps."""
    from erasekit.concepts import encode
    from erasekit.methods.advunlearn import retain_set
    from erasekit.methods.closed_form import applied, as_delta, uce_edit, weights_of
    from erasekit.methods.mace_parts import fuse

    started = time.perf_counter()
    if request.preserve:
        raise ErasekitError("mace keeps its retain prompts (--set retain_prompts=...) rather than --preserve; drop --preserve")
    if config.anchor and any(" ".join(config.anchor.lower().split()) == " ".join(c.lower().split()) for c in request.targets):
        raise SettingError("anchor", f"{{name}} {config.anchor!r} is one of the concepts being erased; choose a broader word or leave it empty")
    concepts = tuple(request.targets)
    retain = retain_set(config, list(concepts))
    original = weights_of(pipe)
    refined = uce_edit(original, refinement_rows(pipe, concepts, config.anchor, retain), config.lam, 1.0, config.preserve_scale) if config.refine else original
    data = [concept_data(pipe, c, config, len(concepts) > 1) for c in concepts]
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, Any]] = []
    total = config.iterations * len(concepts)

    def report(concept: str, step: int, loss: float) -> None:
        record = {"step": len(history) + 1, "target": concept, "erase_loss": round(loss, 6), "preserve_loss": 0.0}
        history.append(record)
        if progress:
            progress(len(history), total, record)

    unet = pipe.unet
    was = applied(unet, refined)  # the LoRAs train on the refined model
    unet.requires_grad_(False)
    try:
        updates = [train_lora(pipe, c, lat, m, config, generator, report) for c, (lat, m) in zip(concepts, data)]
    finally:
        applied(unet, was)
    keys = [encode(pipe, [t.format(c) for t in TRAIN_TEMPLATES]).to(dtype=torch.float64, device="cpu").flatten(0, 1) for c in concepts]
    keep = encode(pipe, [*retain, ""]).to(dtype=torch.float64, device="cpu").flatten(0, 1)
    targets = [{n: w + u[n].to(w) if n in u else w for n, w in refined.items()} for u in updates]  # the LoRA updates come back on the CPU
    fused = fuse(refined, targets, keys, keep, config.fusion_scale * len(keys))
    history.append({"fusion": {"concepts": len(concepts), "retain_prompts": len(retain), "refined": config.refine}})
    return make_result(pipe, request, "mace", config, as_delta(fused, unet), "weights", history,
                       {"total_s": round(time.perf_counter() - started, 3)}, concepts, ())
