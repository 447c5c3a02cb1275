"""Settings of `erasekit world train`, and reading back the settings of a run to resume."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from erasekit.errors import ErasekitError

STAGES = ("data", "vae", "clip", "judge", "unet", "export")
FORMAT = 2  # 1: text encoder trained jointly with the UNet; 2: the UNet under a frozen toy CLIP text tower


@dataclass
class WorldTrainConfig:
    """Sizes and schedules of `erasekit world train` (defaults: the run that built the shipped v2 world; its world_train.json records them)."""

    seed: int = field(default=0, metadata={"help": "Seed for data, initialisation and training."})
    n_images: int = field(default=40000, metadata={"help": "Rendered training images."})
    n_heldout: int = field(default=2000, metadata={"help": "Rendered held-out images for the judge's accuracy."})
    vae_steps: int = field(default=800, metadata={"help": "AutoencoderKL training steps (batch 64)."})
    clip_steps: int = field(default=2000, metadata={"help": "Toy CLIP contrastive training steps."})
    clip_batch: int = field(default=256, metadata={"help": "Toy CLIP batch size (image-caption pairs)."})
    clip_lr: float = field(default=5e-4, metadata={"help": "AdamW peak learning rate of the toy CLIP."})
    pair_word_p: float = field(default=0.3, metadata={
        "help": "Probability that a caption names a look-alike pair's object by the vague word the pair shares."})
    clip_swap_p: float = field(default=0.25, metadata={
        "help": "Probability that a toy-CLIP caption names a look-alike pair's object by its partner (alt-text noise; not the UNet's captions)."})
    clip_logit_scale: float = field(default=0.0, metadata={
        "help": "Fixed logit scale (1/temperature) of the toy CLIP's InfoNCE; 0 learns it, as CLIP does."})
    judge_steps: int = field(default=1500, metadata={"help": "Judge training steps (batch 128)."})
    unet_steps: int = field(default=3500, metadata={"help": "UNet training steps (the text encoder is frozen)."})
    batch_size: int = field(default=64, metadata={"help": "UNet batch size."})
    lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the UNet."})
    cfg_dropout: float = field(default=0.1, metadata={"help": "Probability of training on the empty prompt (for CFG)."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the exported weights."})
    checkpoint_every: int = field(default=250, metadata={"help": "Steps between checkpoints."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})


# The first stage each setting shapes (later stages are built on it): on resume, a setting may change only while
# that stage has not begun. Settings not listed (checkpoint_every, threads) change nothing a stage computes.
STAGE_OF = {
    "seed": "data", "n_images": "data", "n_heldout": "data", "vae_steps": "vae",
    "clip_steps": "clip", "clip_batch": "clip", "clip_lr": "clip", "pair_word_p": "clip", "clip_swap_p": "clip", "clip_logit_scale": "clip",
    "judge_steps": "judge", "unet_steps": "unet", "batch_size": "unet", "lr": "unet", "cfg_dropout": "unet",
    "ema_decay": "unet",
}


def load_saved_config(out: Path) -> tuple[WorldTrainConfig, str] | None:
    """The config and run id of the run ``out`` holds, None if it holds none; a one-line error if it cannot resume."""
    path = out / "work" / "config.json"
    if not path.is_file():
        if out.exists() and any(out.iterdir()):
            raise ErasekitError(f"{out} exists and holds no toy-world run to resume; pick a new --out")
        return None
    try:
        raw = json.loads(path.read_text())
        fmt, run_id = raw.pop("format", 1), raw.pop("run_id", "")
        if fmt != FORMAT:
            raise ErasekitError(
                f"{out} holds a toy-world v{fmt} run (text encoder trained with the UNet); "
                f"this erasekit builds v{FORMAT} (a frozen toy CLIP): pick a new --out"
            )
        return WorldTrainConfig(**raw), str(run_id)
    except (ValueError, TypeError) as exc:
        raise ErasekitError(f"{path} is corrupt ({exc}); pick a new --out") from None


def check_world_folder(folder: Path) -> Path:
    """The pipeline folder of a toy world (its own folder or ``pipeline/`` inside it); refuses a v1 world in one line.

    A folder that belongs to no toy world (no ``world_train.json`` beside or above it) is returned as is; the
    world shipped inside the package is a v2 world like any other (a test checks its ``world_train.json``).
    """
    for world, pipeline in ((folder, folder / "pipeline"), (folder.parent, folder)):
        meta = world / "world_train.json"
        if meta.is_file() and (pipeline / "model_index.json").is_file():
            try:
                fmt = json.loads(meta.read_text()).get("format", 1)
            except ValueError:
                raise ErasekitError(f"{meta} is corrupt; rebuild the world with `erasekit world train`") from None
            if fmt != FORMAT:
                raise ErasekitError(
                    f"{world} is a toy world v{fmt} (its text encoder was trained with the UNet, not a frozen CLIP); "
                    f"rebuild it with `erasekit world train --out DIR` or use --model toy"
                )
            return pipeline
    return folder
