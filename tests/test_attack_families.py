"""The adversarial-token attack on every family (SD, SDXL, SD3, FLUX.1), on tiny random models saved to a folder.

The search reaches the model only through its family: the schedule's training draws, ``predict``, and the
prompt encoding with adversarial slots. Its invariant on every family: each recorded loss is the loss of
the real discrete prompt it reports, so re-encoding that prompt as plain text gives the same loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from erasekit.attack.run import SEARCH_SEED_OFFSET, AttackConfig, _toy_words, base_images
from erasekit.attack.search import candidate_tokens, prompt_losses, search_tokens
from erasekit.families import family_of
from erasekit.families.tiny import FAMILIES, build_tiny
from erasekit.models import load_pipeline

torch.set_num_threads(1)
PROMPTS = ["an image of a circle", "a red circle"]
SEARCH: dict[str, Any] = {"tokens": 2, "iterations": 6, "lr": 3.0, "draws": 2, "seeds": [11, 12]}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attack-families")
    return {f: build_tiny(f, root / f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_search_runs_on_each_family_and_its_best_prompts_re_encode_to_their_recorded_loss(family: str, folders: dict[str, Path]) -> None:
    pipe = load_pipeline(str(folders[family]))
    fam = family_of(pipe)
    assert fam.name == family
    x0, images = base_images(pipe, PROMPTS, AttackConfig(steps=2, guidance=3.0))
    assert x0.shape == (len(PROMPTS), *fam.latent_shape(pipe)[1:]), "the pipeline's latents come in the layout the family describes"
    assert images.shape == (len(PROMPTS), fam.image_size(pipe), fam.image_size(pipe), 3)
    candidates = candidate_tokens(fam.slot_tokenizer(pipe), _toy_words(), ["circle"])
    found = search_tokens(pipe, PROMPTS, x0.float(), candidates, **SEARCH)

    assert len(found.loss_history) == SEARCH["iterations"] + 1 and all(math.isfinite(v) for v in found.loss_history)
    assert all(math.isfinite(v) for v in [*found.initial_loss, *found.best_loss, *found.plain_loss])
    assert all(b <= i for b, i in zip(found.best_loss, found.initial_loss))
    assert max(found.best_step) > 0, "the search moved off its start tokens: the check below is about prompts it chose"
    adversarial = [f"{found.prefix(i)} {p}" for i, p in enumerate(PROMPTS)]
    again = prompt_losses(pipe, adversarial, x0.float(), len(candidates.ids), SEARCH["tokens"], SEARCH["draws"], SEARCH["seeds"])
    assert again.tolist() == pytest.approx(found.best_loss, rel=1e-5, abs=1e-6)
    plain = prompt_losses(pipe, PROMPTS, x0.float(), len(candidates.ids), SEARCH["tokens"], SEARCH["draws"], SEARCH["seeds"])
    assert plain.tolist() == pytest.approx(found.plain_loss, rel=1e-6)


@pytest.mark.parametrize(("family", "clip_towers"), [("sd", 1), ("sdxl", 2), ("sd3", 2), ("flux", 1)])
def test_slots_reach_every_clip_encoder_and_equal_the_plain_prompt_at_real_tokens(family: str, clip_towers: int, folders: dict[str, Path]) -> None:
    pipe = load_pipeline(str(folders[family]))
    fam = family_of(pipe)
    candidates = candidate_tokens(fam.slot_tokenizer(pipe), (), ())
    chosen = [3, 7]
    text = " ".join(candidates.words[i] for i in chosen) + " a red circle"
    slots = fam.slot_rows(pipe, candidates.ids[chosen]).unsqueeze(0).requires_grad_(True)
    encoders = fam.slot_encoders(pipe)
    widths = [enc.get_input_embeddings().weight.shape[1] for _, enc in encoders]
    assert len(encoders) == clip_towers and slots.shape == (1, 2, sum(widths))

    cond = fam.encode_with_slots(pipe, [text], slots)
    plain = fam.encode(pipe, [text])
    assert set(cond.parts) == set(plain.parts)
    for name, value in cond.parts.items():
        assert torch.allclose(value, plain.parts[name], atol=1e-6), name
    (grad,) = torch.autograd.grad(sum(v.float().square().sum() for v in cond.parts.values()), slots)
    assert all(part.abs().sum() > 0 for part in grad.split(widths, dim=-1)), "the gradient comes from every CLIP encoder"
    # encoders with their own vocabulary (T5) read the words as text: no graph through them, and their weights are left as they were
    assert all(p.requires_grad for enc in fam.text_only_encoders(pipe) for p in enc.parameters())


def test_erasekit_attack_on_an_erased_flux_folder_runs_end_to_end_and_reports_its_prompts_losses(folders: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from erasekit.cli import app

    runner = CliRunner()
    model, run = str(folders["flux"]), tmp_path / "run"
    erased = runner.invoke(app, ["erase", "--model", model, "--concept", "circle", "--budget", "tiny", "--out", str(run)])
    assert erased.exit_code == 0, erased.output
    settings = {"n_prompts": 2, "tokens": 2, "iterations": 3, "steps": 2, "noise_draws": 1, "seed": 4}
    attacked = runner.invoke(app, ["attack", str(run), "--concept", "circle", *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]])
    assert attacked.exit_code == 0, attacked.output
    assert "ASR" in attacked.stdout
    record = json.loads((run / "attack-circle" / "attack.json").read_text())
    assert record["model"] == model and set(record["metrics"]) == {"asr", "adversarial_rate", "no_attack_rate", "base_rate"}
    assert len(record["loss_history"]) == settings["iterations"] + 1
    assert (run / "attack-circle" / "attack.png").read_bytes().startswith(b"\x89PNG")

    # the recorded best losses are those of the reported prompts, as text, on the erased model
    from erasekit.result import load_result

    config = AttackConfig(**settings)
    prompts = [p["prompt"] for p in record["prompts"]]
    x0, _ = base_images(load_pipeline(model), prompts, config)
    pipe = load_result(run / "delta.safetensors").apply(load_pipeline(model))
    seeds = [config.seed + SEARCH_SEED_OFFSET + i for i in range(len(prompts))]
    again = prompt_losses(pipe, [p["adversarial_prompt"] for p in record["prompts"]], x0.float(), record["candidates"], config.tokens,
                          config.noise_draws, seeds)
    assert again.tolist() == pytest.approx([p["best_loss"] for p in record["prompts"]], rel=1e-5, abs=1e-6)


def test_the_attack_refuses_in_one_line_what_it_cannot_search(folders: dict[str, Path]) -> None:
    from erasekit.errors import ErasekitError
    from erasekit.families.tiny import clip_tokenizer
    from erasekit.models import release_unused

    pipe = load_pipeline(str(folders["sdxl"]))
    pipe.tokenizer_2 = clip_tokenizer(merges=100)  # a second CLIP tower reading another vocabulary: one token id cannot mean one word
    with pytest.raises(ErasekitError, match="different vocabularies"):
        family_of(pipe).check_slots(pipe)
    released = load_pipeline(str(folders["flux"]))
    release_unused(released)
    with pytest.raises(ErasekitError, match="released"):
        family_of(released).check_slots(released)
