"""EAR's ``lora`` train set on a tiny random Janus: a PEFT LoRA on the language model's attention projections, merged
into a plain weights delta (only q/k/v/o change, each by rank <= lora_rank), deterministic, save/load-exact, on the CLI.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import erasekit
from erasekit.autoregressive import encode_prompts, generate, image_logits, load_janus, sample_image_tokens, train_parameters
from erasekit.autoregressive.janus import ImageLogits, Janus
from erasekit.autoregressive.lora import add_janus_lora, lora_layers, remove_janus_lora
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.methods.base import ErasureRequest
from erasekit.methods.ear import EARConfig, fit_ear, frozen_logits
from erasekit.result import ErasureResult, load_result

RANK = 2
FAST = {"iterations": 3, "lr": 1e-2, "window_size": 8, "threshold": 0.0, "train_method": "lora", "lora_rank": RANK}
PROJECTIONS = re.compile(r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight")
runner = CliRunner()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fit(janus: Janus, **settings: object) -> ErasureResult:
    result: ErasureResult = fit_ear(janus, ErasureRequest(("circle",)), EARConfig(**{**FAST, **settings}))  # type: ignore[arg-type]
    return result


@pytest.fixture(scope="module")
def fitted(janus_dir: Path) -> tuple[dict[str, torch.Tensor], ErasureResult, Janus]:
    """The base state, one LoRA EAR result, and the model it ran on (handed back)."""
    janus = load_janus(janus_dir)
    before = _state(janus.model)
    rng = torch.get_rng_state()
    result = _fit(janus)
    assert torch.equal(torch.get_rng_state(), rng), "fit_ear with lora must leave the global RNG alone"
    return before, result, janus


def test_lora_changes_only_the_language_models_attention_projections(fitted: tuple[dict[str, torch.Tensor], ErasureResult, Janus]) -> None:
    before, result, janus = fitted
    # handed back as it was: no PEFT layer, no adapter weights, no PEFT config, every tensor bit-identical
    assert not lora_layers(janus.model) and not hasattr(janus.model, "peft_config")
    after = _state(janus.model)
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
    assert not any(p.requires_grad for p in janus.model.parameters())
    assert result.kind == "weights" and result.family == "janus" and result.config["train_method"] == "lora"
    names = {k.removeprefix("janus.") for k in result.delta}
    assert names == set(train_parameters(janus.model, "lora")) and len(names) == 8  # q/k/v/o of both layers
    assert all(PROJECTIONS.fullmatch(n) for n in names)
    result.apply(janus)
    try:
        changed = {k for k, v in _state(janus.model).items() if not torch.equal(v, before[k])}
    finally:
        janus.model.load_state_dict(before)  # the module's fixture model stays the base
    assert changed == names  # every projection moved, every other parameter (MLP, head, embeddings, VQ, vision) untouched


def test_each_matrix_changes_by_rank_at_most_lora_rank(fitted: tuple[dict[str, torch.Tensor], ErasureResult, Janus]) -> None:
    before, result, _ = fitted
    for key, after in result.delta.items():
        change = after.double() - before[key.removeprefix("janus.")].double()
        singular = torch.linalg.svdvals(change)
        rank = int(torch.linalg.matrix_rank(change, rtol=1e-4))  # float32 rounding of W + BA sits far below 1e-4 of the top value
        assert 1 <= rank <= RANK < min(change.shape), (key, rank, singular[: RANK + 2])


def test_same_seed_gives_the_same_delta_whatever_the_global_rng(janus_dir: Path,
                                                                fitted: tuple[dict[str, torch.Tensor], ErasureResult, Janus]) -> None:
    _, first, _ = fitted
    torch.manual_seed(12345)  # another global RNG state: the LoRA init must not read it
    again = _fit(load_janus(janus_dir))
    assert again.delta.keys() == first.delta.keys() and all(torch.equal(again.delta[k], first.delta[k]) for k in first.delta)
    other = _fit(load_janus(janus_dir), seed=1, iterations=1)
    assert any(not torch.equal(other.delta[k], first.delta[k]) for k in first.delta)


def test_save_load_apply_gives_identical_generations(janus_dir: Path, tmp_path: Path,
                                                     fitted: tuple[dict[str, torch.Tensor], ErasureResult, Janus]) -> None:
    _, result, _ = fitted
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    applied = result.apply(load_janus(janus_dir))
    loaded = erasekit.load(load_janus(janus_dir), result.save(tmp_path / "run"))
    assert np.array_equal(generate(applied, prompts, seeds), generate(loaded, prompts, seeds))
    assert all(torch.equal(a, b) for a, b in zip(applied.model.state_dict().values(), loaded.model.state_dict().values(), strict=True))
    back = load_result(tmp_path / "run")
    assert back.kind == "weights" and back.config["train_method"] == "lora" and back.config["lora_rank"] == RANK
    base = load_janus(janus_dir)
    encoded = encode_prompts(base, prompts[:1])
    tokens = sample_image_tokens(base, encoded, [0], guidance=5.0)
    with torch.no_grad():  # the erased model is not the base: its image-token distribution moved
        assert not torch.allclose(image_logits(loaded.model, encoded, tokens), image_logits(base.model, encoded, tokens), atol=1e-5)


def test_frozen_logits_with_a_trained_adapter_are_the_base_models(janus_dir: Path) -> None:
    janus = load_janus(janus_dir)
    encoded = encode_prompts(janus, ["a red circle"])
    tokens = sample_image_tokens(janus, encoded, [0], guidance=5.0)
    with torch.no_grad():
        base = image_logits(janus.model, encoded, tokens)
    params = add_janus_lora(janus.model, RANK, seed=0)
    assert params and all(".lora_" in n for n in params) and all(p.requires_grad for p in params.values())
    assert not any(p.requires_grad for n, p in janus.model.named_parameters() if n not in params)  # the base stays frozen
    with torch.no_grad():
        for name, p in params.items():
            if ".lora_B." in name:
                p.add_(torch.randn_like(p))
        assert not torch.allclose(image_logits(janus.model, encoded, tokens), base, atol=1e-4)
    assert torch.equal(frozen_logits(ImageLogits(janus.model), {}, encoded, tokens), base)
    assert layers_enabled(janus.model)  # the adapter is back on after the frozen forward
    with pytest.raises(ErasekitError, match="already carries a LoRA adapter"):
        _fit(janus)
    assert lora_layers(janus.model), "a refused run must not remove an adapter it did not add"
    remove_janus_lora(janus.model)
    with torch.no_grad():
        assert torch.equal(image_logits(janus.model, encoded, tokens), base)


def layers_enabled(model: torch.nn.Module) -> bool:
    return all(not layer.disable_adapters for layer in lora_layers(model).values())


def test_bad_lora_rank_is_refused_in_one_line(janus_dir: Path, tmp_path: Path) -> None:
    for rank in (0, -1, 10**6):
        with pytest.raises(ErasekitError, match="lora_rank") as info:
            EARConfig(train_method="lora", lora_rank=rank).validate()
        assert "\n" not in str(info.value)
    out = tmp_path / "run"
    res = runner.invoke(app, ["erase", "--model", str(janus_dir), "-c", "circle", "--method", "ear", "--train-method", "lora",
                              "--lora-rank", "0", "--out", str(out)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--lora-rank must be >= 1" in lines[0], res.output
    assert not out.exists()


def test_cli_erase_with_lora_runs_end_to_end(janus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, ["erase", "--model", str(janus_dir), "-c", "circle", "--method", "ear", "--budget", "tiny",
                              "--train-method", "lora", "--lora-rank", str(RANK), "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = load_result(out)
    assert result.kind == "weights" and result.family == "janus" and result.config["train_method"] == "lora"
    assert {k.removeprefix("janus.") for k in result.delta} <= set(train_parameters(load_janus(janus_dir).model, "lora"))
    shown = runner.invoke(app, ["erase", "--method", "ear", "--show-settings"])
    assert shown.exit_code == 0 and "--lora-rank" in shown.output and "lora" in shown.output, shown.output
