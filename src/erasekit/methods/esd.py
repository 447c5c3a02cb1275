"""ESD (Gandikota et al., ICCV 2023): fine-tune toward the negatively guided prediction of the frozen model."""

from __future__ import annotations

from dataclasses import dataclass, field

from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, Progress, TrainConfig
from erasekit.methods.loop import finetune
from erasekit.result import ErasureResult


@dataclass
class ESDXConfig(TrainConfig):
    """ESD-x: cross-attention only (the paper's choice for objects and artists)."""

    train_method: str = field(default="xattn", metadata={"help": "Parameters to train (ESD-x: xattn)."})


@dataclass
class ESDUConfig(TrainConfig):
    """ESD-u: everything but cross-attention (the paper's choice for nudity)."""

    train_method: str = field(default="noxattn", metadata={"help": "Parameters to train (ESD-u: noxattn)."})


def fit_esd_x(pipe: Pipeline, request: ErasureRequest, config: TrainConfig, progress: Progress | None) -> ErasureResult:
    """ESD-x: train cross-attention toward the negatively guided prediction (loss on eps)."""
    return finetune(pipe, request, config, progress, method="esd-x", loss_space="eps")


def fit_esd_u(pipe: Pipeline, request: ErasureRequest, config: TrainConfig, progress: Progress | None) -> ErasureResult:
    """ESD-u: train every non-cross-attention weight toward the negatively guided prediction (loss on eps)."""
    return finetune(pipe, request, config, progress, method="esd-u", loss_space="eps")
