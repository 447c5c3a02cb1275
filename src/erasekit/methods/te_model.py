"""Training a pipeline's text encoder while its denoiser stays frozen (AdvUnlearn, few-shot text-encoder unlearning).

:class:`TextEncoderModel` has the interface the one life cycle (:func:`erasekit.methods.trainer.train`) reads from a
trainable model (``params``, ``device``, ``eps``, ``frozen_eps``, ``delta``, ``restore``), so a text-encoder run gets
resume, Ctrl-C, checkpoints and the NaN guard as every denoiser run does. Its delta is a ``weights`` delta of
``text_encoder.<name>`` keys, applied by ``erasekit.load``/``apply`` like any other.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from erasekit import distributed as dist
from erasekit.concepts import check_prompt, encode_cond
from erasekit.errors import ErasekitError
from erasekit.families import Cond, family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest
from erasekit.models import is_released, weights_hash

TE_LAYERS = ("all", "attn", "mlp", "last")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def te_parameters(encoder: nn.Module, layers: str) -> dict[str, nn.Parameter]:
    """The text-encoder parameters a set trains; token and position embeddings never (the vocabulary stays the base's).

    ``all``: every transformer layer and the final norm (AdvUnlearn's ``text_encoder_full``); ``attn``: the layers'
    self-attention; ``mlp``: their MLPs; ``last``: the final layer's attention and MLP (few-shot unlearning).
    """
    if layers not in TE_LAYERS:
        raise ErasekitError(f"unknown text-encoder layer set {layers!r}; choose one of: {', '.join(TE_LAYERS)}")
    named = dict(encoder.named_parameters())
    indices = sorted({int(m.group(1)) for n in named if (m := _LAYER.search(n))})
    if not indices:
        raise ErasekitError(f"this text encoder ({type(encoder).__name__}) has no numbered transformer layers to train")
    chosen = {}
    for name, param in named.items():
        m = _LAYER.search(name)
        if layers == "all":
            keep = m is not None or "final_layer_norm" in name
        elif m is None:
            keep = False
        elif layers == "last":
            keep = int(m.group(1)) == indices[-1] and (".self_attn." in name or ".mlp." in name)
        else:
            keep = (".self_attn." if layers == "attn" else ".mlp.") in name
        if keep:
            chosen[name] = param
    if not chosen:
        raise ErasekitError(f"text-encoder layer set {layers!r} selects no parameter of this {type(encoder).__name__}")
    return chosen


class TextEncoderModel:
    """The pipeline's text encoder with a trainable subset; the denoiser is frozen and sees the encoder's output.

    ``eps`` and ``frozen_eps`` both run the (unchanged) denoiser: the first keeps the graph back to the
    conditioning (and so to the encoder's weights), the second is a constant. Base conditionings are encoded
    before training starts (:func:`prepare_te`), so no second copy of the encoder is kept.
    """

    prefix = "text_encoder"

    def __init__(self, pipe: Pipeline, layers: str) -> None:
        self.pipe = pipe
        self.family = family_of(pipe)
        if self.family.name != "sd":
            raise ErasekitError(f"text-encoder training runs on SD 1.x/2.x pipelines (one CLIP) for now, not {self.family.label}")
        encoder = getattr(pipe, "text_encoder", None)
        if not isinstance(encoder, nn.Module) or is_released(encoder):
            raise ErasekitError("this pipeline's text encoder was released by erase(..., release_unused=True); load the model again to train it")
        self.encoder = encoder
        self.unet = self.family.denoiser(pipe)
        self.unet.requires_grad_(False)
        self.unet.eval()
        encoder.requires_grad_(False)
        encoder.eval()
        self.params = te_parameters(encoder, layers)
        self.originals = {n: p.detach().clone() for n, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(True)

    @property
    def device(self) -> torch.device:
        """Where the denoiser's weights live (the latents' device)."""
        return next(self.unet.parameters()).device

    def encode(self, prompts: Sequence[str]) -> Cond:
        """The current encoder's conditioning of ``prompts``, differentiable in the trained weights."""
        return self.family._encode(self.pipe, prompts)

    def encode_slots(self, prompts: Sequence[str], slots: torch.Tensor) -> Cond:
        """:meth:`encode` with free token embeddings at positions 1..N (B x N x width), differentiable in both."""
        return self.family.encode_with_slots(self.pipe, prompts, slots)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The frozen denoiser's output on ``cond`` (the graph runs back through ``cond``)."""
        return self.family.predict(self.unet, x, t, cond)

    def frozen_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The denoiser's output as a constant (give it a base conditioning for the base model's output)."""
        with torch.inference_mode():
            out = self.family.predict(self.unet, x, t, cond.detach())
        return out.clone()

    def delta(self) -> tuple[dict[str, torch.Tensor], str]:
        """The changed text-encoder tensors (a ``weights`` delta)."""
        return {f"{self.prefix}.{n}": p.detach().clone().contiguous() for n, p in self.params.items()}, "weights"

    def restore(self) -> None:
        """Put the text encoder back to its original weights and freeze it."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.originals[name])
        self.encoder.requires_grad_(False)


def prepare_te(pipe: Pipeline, request: ErasureRequest, config: Any, layers: str) -> Any:
    """The shared state of a text-encoder run (a :class:`~erasekit.methods.trainer.Setup` whose trainable is the encoder).

    The targets' and the empty prompt's base conditionings are encoded here, before any weight moves. The
    run keeps the text encoder, so ``release_unused`` frees nothing of it (the request is taken without it).
    """
    from erasekit.methods.trainer import Setup

    started = time.perf_counter()
    dist.check_precision(config.precision)
    targets = [check_prompt(pipe, t, "concept") for t in request.targets]
    preserve = [check_prompt(pipe, p, "preserve concept") for p in request.preserve]
    base_hash = request.base_hash or weights_hash(pipe)
    trainable = TextEncoderModel(pipe, layers)
    family = trainable.family
    return Setup(
        pipe=pipe, config=config, targets=targets, preserve=preserve,
        emb_null=family.uncond(pipe), emb_targets=encode_cond(pipe, targets),
        emb_preserve=encode_cond(pipe, preserve) if preserve else None,
        family=family, schedule=family.schedule(pipe, config.ddim_steps), trainable=trainable,
        optimizer=torch.optim.Adam(list(trainable.params.values()), lr=config.lr),
        generator=torch.Generator().manual_seed(config.seed), base_hash=base_hash, started=started,
    )
