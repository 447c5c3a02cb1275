"""The last stage of `erasekit world train`: the trained parts assembled into a toy-world folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from erasekit.atomic import atomic_folder, atomic_write_bytes
from erasekit.world import toy
from erasekit.world.config import FORMAT, STAGES


def export_world(work: Path, out: Path, config: dict[str, Any]) -> None:
    """Write ``out``/pipeline (fp16 on disk), ``out``/clip, ``out``/judge and ``out``/world_train.json from a run's ``work`` folder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from erasekit.world.clip import load_clip, save_clip

    pipe: Any = StableDiffusionPipeline(  # Any: its components are set at run time
        vae=AutoencoderKL.from_pretrained(work / "vae_model"),
        text_encoder=CLIPTextModel.from_pretrained(work / "text_model"),
        tokenizer=toy.build_tokenizer(),
        unet=UNet2DConditionModel.from_pretrained(work / "unet_model"),
        scheduler=toy.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    with atomic_folder(out / "pipeline") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    with atomic_folder(out / "judge") as tmp:
        shutil.copytree(work / "judge_model", tmp, dirs_exist_ok=True)
    model = load_clip(work / "clip_model", CLIPTextModel.from_pretrained(work / "text_model"))
    with atomic_folder(out / "clip") as tmp:
        save_clip(model, tmp)
    meta: dict = {"format": FORMAT, "config": config, "seconds": {}, "devices": {}}
    for stage in STAGES[:-1]:
        info = json.loads((work / f"{stage}.done").read_text())
        meta["seconds"][stage] = info.pop("seconds", None)
        meta["devices"][stage] = info.pop("device", "cpu")  # runs from before --device ran on the CPU
        info.pop("resumed", None)
        meta.update(info)
    atomic_write_bytes(out / "world_train.json", json.dumps(meta, indent=1).encode())
