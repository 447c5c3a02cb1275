"""Shared config fields and the trainable-UNet wrapper every fine-tuning method uses (the registry itself is in `specs`)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.func import functional_call

from erasekit.errors import ErasekitError
from erasekit.families import Cond, Family, family_of
from erasekit.families.base import Pipeline
from erasekit.methods.specs import _REGISTRY, ALL_FAMILIES, KINDS, MethodSpec, get_method, make_config, register_method, registry  # noqa: F401  (re-exported)
from erasekit.models import add_lora, lora_disabled, lora_state_dict, remove_lora

Progress = Callable[[int, int, dict[str, Any]], None]


@dataclass(frozen=True)
class ErasureRequest:
    """What to erase and what to keep, independent of the method."""

    targets: tuple[str, ...]
    preserve: tuple[str, ...] = ()
    checkpoint: Any = None  # a methods.checkpoint.CheckpointSpec: save/resume the run there
    release_unused: bool = False  # the caller is done with the pipeline: free text encoder and VAE once embeddings exist
    base_hash: str = ""  # the base weights' hash, taken once by erasekit.erase before a method runs


def make_result(
    pipe: Pipeline, request: ErasureRequest, method: str, config: Any, delta: dict[str, torch.Tensor], kind: str = "weights",
    history: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (), timings: dict[str, float] | None = None,
    concepts: tuple[str, ...] | None = None, preserve: tuple[str, ...] | None = None,
) -> Any:
    """The ErasureResult of a run, built the same way for every method (base id and hash, family, config)."""
    from erasekit.models import model_id, weights_hash
    from erasekit.result import ErasureResult

    return ErasureResult(
        method=method, concepts=tuple(concepts if concepts is not None else request.targets),
        preserve=tuple(preserve if preserve is not None else request.preserve), delta=delta, kind=kind,
        config=dataclasses.asdict(config), base_model_id=model_id(pipe), base_hash=request.base_hash or weights_hash(pipe),
        history=tuple(history), timings=dict(timings or {}), family=family_of(pipe).name,
    )


class Method(Protocol):
    """Every method has the same signature, so they compose (k-diffusion style)."""

    def __call__(self, pipe: Pipeline, request: ErasureRequest, config: Any, progress: Progress | None) -> ErasureResultT:
        """Fit the erasure and return an ErasureResult; the pipeline is left as it was."""


ErasureResultT = Any


@dataclass
class MethodConfig:
    """What every method's settings share: a seed and ``validate``."""

    seed: int = field(default=0, metadata={"help": "Seed of every random draw of the run."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages (methods extend it); every field must be of its type, floats finite."""
        from erasekit.checks import check_fields, check_seed

        check_fields(self)
        check_seed("seed", self.seed)

    def check_concepts(self, targets: Sequence[str]) -> None:
        """Refuse settings that contradict the concepts being erased (e.g. All-but-One's ``into`` naming one); none by default."""


@dataclass
class TrainConfig(MethodConfig):
    """Fields shared by the fine-tuning methods (ESD family, EAP)."""

    iterations: int = field(default=1000, metadata={"help": "Model update steps (ESD, Gandikota et al. 2023: 1000)."})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the model (ESD/EAP: 1e-5)."})
    train_method: str = field(default="xattn", metadata={"help": "Parameters to train: xattn (objects, styles), noxattn (nudity), full, selfattn, lora."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank when train_method is lora."})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the rollout that produces x_t (reference: 50)."})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the rollout (reference: 3)."})
    negative_guidance: float = field(default=1.0, metadata={"help": "eta of the ESD target eps0(x,0) - eta (eps0(x,c) - eps0(x,0)) (reference: 1)."})
    preserve_weight: float = field(default=1.0, metadata={"help": "lambda: weight of the preservation loss (EAP: 1)."})
    batch_size: int = field(default=1, metadata={"help": "Rollout points per model step, averaged (reference: 1); under accelerate launch they are split across processes."})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 autocast for the UNet's forwards (reference: fp32); weights and losses stay fp32."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        from erasekit.checks import MAX_GUIDANCE, MAX_ITERATIONS, MAX_LORA_RANK, MAX_LR, MAX_WEIGHT, check_between

        check_between("iterations", self.iterations, 1, MAX_ITERATIONS)
        if self.batch_size < 1:
            raise ErasekitError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ErasekitError(f"unknown precision {self.precision!r}; choose one of: fp32, bf16, fp16")
        check_between("lr", self.lr, 0.0, MAX_LR, low_open=True, why="Adam's step; the papers use 1e-5")
        check_between("ddim_steps", self.ddim_steps, 1, 1000, why="the training timesteps")
        check_between("preserve_weight", self.preserve_weight, 0.0, MAX_WEIGHT, why="the papers use 1")
        check_between("start_guidance", self.start_guidance, 0.0, MAX_GUIDANCE, why="a CFG scale; the reference uses 3")
        check_between("negative_guidance", self.negative_guidance, 0.0, MAX_GUIDANCE, why="ESD's eta; the reference uses 1")
        check_between("lora_rank", self.lora_rank, 1, MAX_LORA_RANK)
        from erasekit.models import TRAIN_METHODS

        if self.train_method not in TRAIN_METHODS:
            raise ErasekitError(f"unknown train_method {self.train_method!r}; choose one of: {', '.join(TRAIN_METHODS)}")


class _Call(nn.Module):
    """The denoiser under its family's call, as one module: ``functional_call`` can then swap its weights."""

    def __init__(self, family: Family, model: nn.Module) -> None:
        super().__init__()
        self.family, self.inner = family, model

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The family's model output."""
        return self.family.predict(self.inner, x, t, cond)


class TrainableModel:
    """The pipeline's denoiser (UNet or transformer, any family) with a chosen trainable subset, and its frozen base.

    Fast path: one copy of the weights; the frozen model is the same network with the LoRA adapter off,
    or (for full-parameter sets) with the saved original tensors swapped in through ``functional_call``.
    Faithful path (``separate_copy``): a deep copy of the whole network, as the reference keeps.
    """

    def __init__(self, pipe: Any, train_method: str, lora_rank: int, separate_copy: bool = False, lora_targets: list[str] | None = None) -> None:
        self.family = family_of(pipe)
        self.prefix = "unet" if hasattr(pipe, "unet") else "transformer"  # the pipeline's attribute, and the delta's key prefix
        self.unet = self.family.denoiser(pipe)
        self.unet.requires_grad_(False)
        self.unet.eval()
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipe, name, None)
            if isinstance(encoder, nn.Module):
                encoder.requires_grad_(False)
        self.lora = train_method == "lora"
        self.frozen_copy = copy.deepcopy(self.unet) if separate_copy else None
        if self.lora:
            with torch.random.fork_rng():  # LoRA's init draws from the global RNG: make it a function of nothing global
                torch.manual_seed(0)
                self.params = add_lora(self.unet, lora_rank, lora_targets or list(self.family.lora_targets))
            self.originals: dict[str, torch.Tensor] = {}
        else:
            self.params = self.family.parameters(self.unet, train_method)
            self.originals = {f"inner.{n}": p.detach().clone() for n, p in self.params.items()}
        for p in self.params.values():
            p.requires_grad_(True)
        self.call = _Call(self.family, self.unet)

    def narrow(self, names: Iterable[str]) -> None:
        """Train only ``names`` of the chosen set (the rest frozen again); only their originals are kept."""
        keep = set(names)
        for name, p in self.params.items():
            p.requires_grad_(name in keep)
        self.params = {n: p for n, p in self.params.items() if n in keep}
        self.originals = {f"inner.{n}": self.originals[f"inner.{n}"] for n in self.params}

    @property
    def device(self) -> torch.device:
        """Where the denoiser's weights live."""
        return next(self.unet.parameters()).device

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The trainable model's output (ε, v or flow velocity: the family's)."""
        return self.family.predict(self.unet, x, t, cond)

    def frozen_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The original model's output (computed under inference mode; a plain constant tensor)."""
        with torch.inference_mode():
            if self.frozen_copy is not None:
                out = self.family.predict(self.frozen_copy, x, t, cond)
            elif self.lora:
                with lora_disabled(self.unet):
                    out = self.family.predict(self.unet, x, t, cond)
            else:
                out = functional_call(self.call, self.originals, (x, t, cond), strict=False)
        # a clone made outside inference mode can enter the autograd graph as a constant
        return out.clone()

    def delta(self) -> tuple[dict[str, torch.Tensor], str]:
        """The changed tensors and their kind (``weights`` or ``lora``)."""
        if self.lora:
            return lora_state_dict(self.unet, self.prefix), "lora"
        return {f"{self.prefix}.{n}": p.detach().clone().contiguous() for n, p in self.params.items()}, "weights"

    def restore(self) -> None:
        """Put the pipeline's denoiser back to its original weights and freeze it."""
        if self.lora:
            remove_lora(self.unet)
        else:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.originals[f"inner.{name}"])
        self.unet.requires_grad_(False)
        self.frozen_copy = None


TrainableUNet = TrainableModel  # the name the SD-only code used


def release_after_setup(pipe: Pipeline, request: ErasureRequest) -> None:
    """Free the text encoder and VAE when the request allows it (call once every embedding is computed)."""
    if request.release_unused:
        from erasekit.models import release_unused

        release_unused(pipe)


STAGES = ("both", "1", "2")


def check_stages(stage: str, stage1: str, builds_on: str, saved: str) -> None:
    """A two-stage method's ``stage`` and ``stage1`` settings: stage 2 alone needs a saved stage 1, the others take none."""
    if stage not in STAGES:
        raise ErasekitError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    if stage == "2" and not stage1.strip():
        raise ErasekitError(f"stage 2 builds on {builds_on}; pass stage1=PATH ({saved}) or run stage both")
    if stage != "2" and stage1.strip():
        raise ErasekitError(f"stage1 is read only by stage 2 alone; drop it or pass stage 2 (stage is {stage!r})")


def esd_target(e_null: torch.Tensor, e_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's negatively guided target: eps0(x,0) - eta (eps0(x,c) - eps0(x,0))."""
    return e_null - eta * (e_concept - e_null)
