"""EAR on a tiny random Janus: ESD on image-token logits, windowed gradient accumulation, thresholded loss masking."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.autoregressive import encode_prompts, generate, image_logits, load_janus, sample_image_tokens, train_parameters, unconditional
from erasekit.autoregressive.delta import apply_delta, janus_weights_hash, load_delta
from erasekit.autoregressive.tiny import build_tiny_janus
from erasekit.errors import ErasekitError
from erasekit.methods.base import ErasureRequest, esd_target
from erasekit.methods.ear import EARConfig, accumulate, fit_ear, position_losses, windows
from erasekit.result import load_result

FAST = {"iterations": 3, "lr": 1e-2, "window_size": 5, "threshold": 0.0}  # window 5 over 16 tokens: uneven windows


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("train_method", ["attn", "mlp", "head", "full", "lora"])
def test_ear_changes_only_its_train_set_and_leaves_the_model_as_it_was(folder: Path, train_method: str) -> None:
    janus = load_janus(folder)
    before = _state(janus.model)
    result = fit_ear(janus, ErasureRequest(("circle",)), EARConfig(**FAST, train_method=train_method))
    assert all(torch.equal(v, before[k]) for k, v in janus.model.state_dict().items()), "fit_ear must restore the model"
    named = set(train_parameters(janus.model, train_method))
    assert result.family == "janus" and result.kind == "weights" and result.method == "ear"
    assert {k.removeprefix("janus.") for k in result.delta} == named
    assert any(not torch.equal(result.delta[f"janus.{n}"], before[n]) for n in named)
    assert [h["updated"] for h in result.history] == [True] * 3 and result.base_hash == janus_weights_hash(janus.model)


def test_threshold_above_the_loss_masks_every_position_and_skips_the_update(folder: Path) -> None:
    janus = load_janus(folder)
    before = _state(janus.model)
    result = fit_ear(janus, ErasureRequest(("circle",)), EARConfig(**{**FAST, "threshold": 1e5}))
    assert all(h["kept"] == 0 and not h["updated"] and h["erase_loss"] > 0 for h in result.history)
    assert all(torch.equal(v, before[k.removeprefix("janus.")]) for k, v in result.delta.items())
    # the same run with masking off (the ablation) trains every position
    ablated = fit_ear(janus, ErasureRequest(("circle",)), EARConfig(**{**FAST, "threshold": 1e5}, masking=False))
    assert all(h["kept"] == h["positions"] == 16 and h["updated"] for h in ablated.history)


def _esd_case(janus) -> tuple[object, torch.Tensor, torch.Tensor]:
    """A target prompt, an image the model draws for it, and the negatively guided logits on it (trainable == frozen here)."""
    prompts = encode_prompts(janus, ["a red circle"])
    tokens = sample_image_tokens(janus, prompts, [0], guidance=5.0)
    with torch.no_grad():
        target = esd_target(image_logits(janus.model, unconditional(janus, prompts), tokens), image_logits(janus.model, prompts, tokens), 1.0)
    return prompts, tokens, target


@pytest.mark.parametrize("window_size", [1, 5, 16])
def test_windowed_accumulation_equals_one_full_backward_when_nothing_is_masked(folder: Path, window_size: int) -> None:
    janus = load_janus(folder)
    params = train_parameters(janus.model, "full")
    for p in params.values():
        p.requires_grad_(True)
    prompts, tokens, target = _esd_case(janus)
    config = EARConfig(window_size=window_size, masking=False)
    step = accumulate(janus.model, prompts, tokens, target, config)
    windowed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    # the answer we know: the gradient of the mean per-position loss over all 16 positions, one forward, one backward
    full = position_losses(image_logits(janus.model, prompts, tokens), target, "logprob").mean()
    full.backward()
    assert step.kept == 16 and step.erase_loss == pytest.approx(full.item(), rel=1e-5)
    assert windowed.keys() == {n for n, p in params.items() if p.grad is not None}
    for name, grad in windowed.items():
        assert torch.allclose(grad, params[name].grad, rtol=1e-4, atol=1e-7), name
    assert windows(16, 5) == [(0, 5), (5, 10), (10, 15), (15, 16)]


def test_masking_drops_exactly_the_positions_below_the_threshold(folder: Path) -> None:
    janus = load_janus(folder)
    prompts, tokens, target = _esd_case(janus)
    with torch.no_grad():
        losses = position_losses(image_logits(janus.model, prompts, tokens), target, "logprob")[0]
    threshold = float(losses.median())
    params = train_parameters(janus.model, "head")
    for p in params.values():
        p.requires_grad_(True)
    step = accumulate(janus.model, prompts, tokens, target, EARConfig(window_size=4, threshold=threshold))
    assert step.kept == int((losses >= threshold).sum()) and 0 < step.kept < 16


def test_logprob_loss_ignores_a_constant_shift_of_the_logits_and_logit_loss_does_not() -> None:
    pred, target = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    shifted = pred + torch.randn(2, 3, 1) * 10
    assert torch.allclose(position_losses(shifted, target, "logprob"), position_losses(pred, target, "logprob"), atol=1e-5)
    assert not torch.allclose(position_losses(shifted, target, "logit"), position_losses(pred, target, "logit"))
    assert torch.allclose(position_losses(target + 3.0, target, "logprob"), torch.zeros(2, 3), atol=1e-6)


def test_ear_pulls_the_target_prompts_prediction_toward_the_negatively_guided_one(folder: Path) -> None:
    janus = load_janus(folder)
    prompts, tokens, target = _esd_case(janus)

    def gap() -> float:
        with torch.no_grad():
            return float(position_losses(image_logits(janus.model, prompts, tokens), target, "logprob").mean())

    before = gap()
    result = fit_ear(janus, ErasureRequest(("a red circle",)), EARConfig(**{**FAST, "iterations": 8, "lr": 1e-3, "train_method": "full"}))
    apply_delta(janus, result)
    assert gap() < 0.5 * before


def test_window_larger_than_the_image_is_refused_in_one_line(folder: Path) -> None:
    janus = load_janus(folder)
    with pytest.raises(ErasekitError, match="window_size 17 is larger than the image's 16 tokens") as info:
        fit_ear(janus, ErasureRequest(("circle",)), EARConfig(window_size=17))
    assert "\n" not in str(info.value)
    fit_ear(janus, ErasureRequest(("circle",)), EARConfig(**{**FAST, "iterations": 1, "window_size": 17}, windowed=False))  # ignored when off
    with pytest.raises(ErasekitError, match="unknown train_method 'xattn'"):
        EARConfig(train_method="xattn").validate()
    with pytest.raises(ErasekitError, match="ear erases from autoregressive .Janus. models; this is a StableDiffusionPipeline"):
        fit_ear(_stable_diffusion(), ErasureRequest(("circle",)), EARConfig())


def _stable_diffusion() -> object:
    from erasekit.families.tiny import tiny_pipeline

    return tiny_pipeline("sd")


def test_save_then_load_of_the_erased_weights_gives_identical_generations(folder: Path, tmp_path: Path) -> None:
    janus = load_janus(folder)
    prompts, tokens, _ = _esd_case(janus)
    result = fit_ear(janus, ErasureRequest(("circle",)), EARConfig(**FAST, train_method="full"))
    path = result.save(tmp_path / "delta.safetensors")
    erased, reloaded = apply_delta(load_janus(folder), result), load_delta(load_janus(folder), path)
    assert np.array_equal(generate(erased, ["a red circle", "a blue square"], [0, 1]), generate(reloaded, ["a red circle", "a blue square"], [0, 1]))
    with torch.no_grad():  # and the erased model is not the base (its image-token distribution moved)
        assert not torch.allclose(image_logits(erased.model, prompts, tokens), image_logits(janus.model, prompts, tokens), atol=1e-4)
    loaded = load_result(path)
    assert loaded.family == "janus" and loaded.config == dataclasses.asdict(EARConfig(**FAST, train_method="full"))


def test_a_delta_for_another_base_or_family_is_refused(folder: Path, tmp_path: Path) -> None:
    janus = load_janus(folder)
    result = fit_ear(janus, ErasureRequest(("circle",)), EARConfig(**{**FAST, "iterations": 1}))
    other = load_janus(build_tiny_janus(tmp_path / "other", seed=1))
    with pytest.raises(ErasekitError, match="hash"):
        apply_delta(other, result)
    with pytest.raises(ErasekitError, match="made on a sd model"):
        apply_delta(janus, dataclasses.replace(result, family="sd"))
    with pytest.raises(ErasekitError, match="does not have"):
        apply_delta(janus, dataclasses.replace(result, delta={"janus.model.nothing.weight": torch.zeros(1)}))


def test_frozen_logits_are_the_base_models_whatever_the_trained_weights(folder: Path) -> None:
    from erasekit.autoregressive.janus import ImageLogits
    from erasekit.methods.ear import frozen_logits

    janus = load_janus(folder)
    prompts, tokens, _ = _esd_case(janus)
    with torch.no_grad():
        base = image_logits(janus.model, prompts, tokens)
    params = train_parameters(janus.model, "full")
    originals = {f"inner.{n}": p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)
        assert not torch.allclose(image_logits(janus.model, prompts, tokens), base, atol=1e-4)
    assert torch.allclose(frozen_logits(ImageLogits(janus.model), originals, prompts, tokens), base, atol=1e-6)
