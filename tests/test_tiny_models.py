"""Tiny random pipelines of every family: they save, load back offline, sample, and build deterministically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from erasekit.families.tiny import (
    FAMILIES,
    IMAGE_SIZE,
    PIPELINES,
    build_tiny,
    clip_tokenizer,
    denoiser,
    t5_tokenizer,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_loads_and_samples(family: str, tmp_path: Path) -> None:
    """A saved tiny pipeline loads as its family's pipeline class and samples finite images of the set size."""
    folder = build_tiny(family, tmp_path / family)
    assert folder == tmp_path / family
    assert (folder / "model_index.json").is_file()
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is PIPELINES[family]
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle", num_inference_steps=2, height=IMAGE_SIZE, width=IMAGE_SIZE,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert out.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_build_is_deterministic(family: str, tmp_path: Path) -> None:
    """Building twice with one seed gives bit-identical denoiser weights; another seed gives other weights."""
    states = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        pipe = DiffusionPipeline.from_pretrained(build_tiny(family, tmp_path / name, seed=seed))
        states.append(denoiser(pipe).state_dict())
    first, again, other = states
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_tokenizers_offline(tmp_path: Path) -> None:
    """The small CLIP and T5 tokenizers round-trip through save/load and carry the special ids the encoders use."""
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    clip.save_pretrained(tmp_path / "clip")
    t5.save_pretrained(tmp_path / "t5")
    clip2 = type(clip).from_pretrained(tmp_path / "clip")
    t52 = type(t5).from_pretrained(tmp_path / "t5")
    for prompt in ("a red circle", "an image of a cat"):
        ids = clip2(prompt).input_ids
        assert ids == clip(prompt).input_ids
        assert ids[0] == clip2.bos_token_id and ids[-1] == clip2.eos_token_id
        assert t52(prompt).input_ids == t5(prompt).input_ids
        assert t52(prompt).input_ids[-1] == t52.eos_token_id
        assert t52.unk_token_id not in t52(prompt).input_ids
    assert (t52.pad_token_id, t52.eos_token_id, t52.unk_token_id) == (0, 1, 2)
    assert len(clip2) == 1024 and clip2.model_max_length == 77
