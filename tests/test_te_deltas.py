"""Deltas that carry the text encoder (weights, LoRA) and inference-time hooks, on tiny random SD pipelines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import erasekit
from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.hooks import generation_hash, hook_result, installed, project_out
from erasekit.models import release_unused, weights_hash
from erasekit.result import ErasureResult, load_result
from erasekit.sampling import generate

V_PROJ = "encoder.layers.0.self_attn.v_proj.weight"
PROMPTS = ["a circle", "a red ring"]


def encoded(pipe, prompt: str = "a circle") -> torch.Tensor:
    """The text encoder's last hidden state for one prompt."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def images(pipe) -> np.ndarray:
    return generate(pipe, PROMPTS, [0, 1], steps=2)


def state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def result_of(pipe, delta: dict[str, torch.Tensor], kind: str = "weights") -> ErasureResult:
    return ErasureResult("test", ("circle",), delta, kind=kind, base_model_id="tiny", base_hash=weights_hash(pipe))


def te_weights(pipe) -> ErasureResult:
    """A weights delta of one text-encoder matrix and one UNet matrix."""
    torch.manual_seed(1)
    te = pipe.text_encoder.get_parameter(V_PROJ)
    unet_name, unet_param = next((n, p) for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    return result_of(pipe, {f"text_encoder.{V_PROJ}": te.detach() + torch.randn_like(te), f"unet.{unet_name}": unet_param.detach() * 0.5})


def te_lora(pipe) -> ErasureResult:
    """A rank-2 LoRA on the text encoder's q and v projections, in PEFT's key format (what diffusers' loader reads)."""
    torch.manual_seed(2)
    delta = {}
    for name, module in pipe.text_encoder.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            delta[f"text_encoder.{name}.lora_A.weight"] = torch.randn(2, module.in_features)
            delta[f"text_encoder.{name}.lora_B.weight"] = torch.randn(module.out_features, 2)
    return result_of(pipe, delta, "lora")


def hook(pipe, seed: int = 3, **settings) -> ErasureResult:
    """A project-out hook on the (only) layer of the tiny CLIP text encoder."""
    torch.manual_seed(seed)
    return hook_result(pipe, "project-out", {"directions": torch.randn(2, 16)}, "circle", layer=-1, settings=settings)


MAKERS = {"weights": te_weights, "lora": te_lora, "hook": hook}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_each_kind_round_trips_through_a_file_and_changes_the_text_encoder_output(kind: str, tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    made = MAKERS[kind](pipe)
    loaded = load_result(made.save(tmp_path / "delta.safetensors"))
    assert loaded.kind == kind and loaded.hook == made.hook and loaded.delta.keys() == made.delta.keys()
    assert all(torch.equal(loaded.delta[k], made.delta[k]) for k in made.delta)
    before = encoded(pipe)
    loaded.apply(pipe)
    assert not torch.allclose(encoded(pipe), before, atol=1e-4), f"a {kind} delta must change what the text encoder outputs"


def test_weights_delta_sets_text_encoder_and_unet_values() -> None:
    pipe = tiny_pipeline()
    result = te_weights(pipe)
    result.apply(pipe)
    for key, value in result.delta.items():
        component, _, name = key.partition(".")
        assert torch.equal(getattr(pipe, component).get_parameter(name), value)


def test_text_encoder_lora_is_fused_into_the_weights_and_unloaded() -> None:
    pipe = tiny_pipeline()
    result = te_lora(pipe)
    names = set(pipe.text_encoder.state_dict())
    before = pipe.text_encoder.get_parameter(V_PROJ).detach().clone()
    result.apply(pipe)
    prefix = f"text_encoder.{V_PROJ.removesuffix('.weight')}"
    expected = before + result.delta[f"{prefix}.lora_B.weight"] @ result.delta[f"{prefix}.lora_A.weight"]
    assert torch.allclose(pipe.text_encoder.get_parameter(V_PROJ), expected, atol=1e-5)
    assert set(pipe.text_encoder.state_dict()) == names, "no LoRA layers may stay behind"


BAD_WEIGHTS = {
    "unknown component": ("text_encoder_2.encoder.layers.0.mlp.fc1.weight", (32, 16), "no 'text_encoder_2' component"),
    "unknown parameter": ("text_encoder.encoder.layers.7.mlp.fc1.weight", (32, 16), "does not have"),
    "shape mismatch": (f"text_encoder.{V_PROJ}", (16, 15), "shape mismatch"),
}


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weights_key_is_refused_in_one_line_before_anything_changes(case: str) -> None:
    pipe = tiny_pipeline()
    key, shape, message = BAD_WEIGHTS[case]
    good = te_weights(pipe).delta  # valid keys first: a refusal must not have copied them in already
    before = state(pipe)
    with pytest.raises(ErasekitError, match=message) as err:
        result_of(pipe, {**good, key: torch.zeros(shape)}).apply(pipe)
    assert "\n" not in str(err.value)
    assert same_state(state(pipe), before)


BAD_LORA = {
    "component its loader skips": ("text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight", (2, 16), "no 'text_encoder_3' component"),
    "missing layer": ("text_encoder.encoder.layers.0.self_attn.nope.lora_A.weight", (2, 16), "no linear layer"),
    "wrong width": ("text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight", (2, 15), "shape mismatch"),
}


@pytest.mark.parametrize("case", list(BAD_LORA))
def test_bad_text_encoder_lora_is_refused_in_one_line_before_anything_changes(case: str) -> None:
    pipe = tiny_pipeline()
    key, shape, message = BAD_LORA[case]
    before = state(pipe)
    with pytest.raises(ErasekitError, match=message) as err:
        result_of(pipe, {**te_lora(pipe).delta, key: torch.zeros(shape)}, "lora").apply(pipe)
    assert "\n" not in str(err.value)
    assert same_state(state(pipe), before) and not hasattr(pipe.text_encoder, "peft_config")


@pytest.mark.parametrize("kind", list(MAKERS))
def test_text_encoder_delta_or_hook_on_a_released_encoder_is_refused(kind: str) -> None:
    pipe = tiny_pipeline()
    result = MAKERS[kind](pipe)
    release_unused(pipe)
    with pytest.raises(ErasekitError, match="released by erase") as err:
        result.apply(pipe, check_base=False)
    assert "\n" not in str(err.value) and not installed(pipe)


def test_hook_changes_generations_without_touching_weights_and_remove_restores_them_bit_for_bit() -> None:
    pipe = tiny_pipeline()
    result = hook(pipe)
    base, base_hash, base_state = images(pipe), weights_hash(pipe), state(pipe)
    result.apply(pipe)
    assert weights_hash(pipe) == base_hash and same_state(state(pipe), base_state), "a hook must not edit weights"
    assert generation_hash(pipe) != base_hash, "the image cache must tell a hooked pipeline from its base"
    assert not np.array_equal(images(pipe), base)
    assert result.remove(pipe) is pipe and not installed(pipe)
    assert np.array_equal(images(pipe), base) and generation_hash(pipe) == base_hash
    with pytest.raises(ErasekitError, match="not on the pipeline"):
        result.remove(pipe)
    result.apply(pipe)
    assert erasekit.remove(pipe) == 1 and erasekit.remove(pipe) == 0
    assert np.array_equal(images(pipe), base)


def test_second_hook_is_refused_until_the_first_is_taken_off() -> None:
    pipe = tiny_pipeline()
    first, second = hook(pipe), hook(pipe, seed=4, scale=0.5)
    first.apply(pipe)
    one = encoded(pipe)
    for again in (first, second):
        with pytest.raises(ErasekitError, match="already carries an erasekit hook") as err:
            again.apply(pipe)
        assert "\n" not in str(err.value)
    assert torch.equal(encoded(pipe), one), "a refused hook must not stack on the first"
    erasekit.remove(pipe)
    second.apply(pipe)
    assert not torch.allclose(encoded(pipe), one)


def test_hook_reaches_the_hidden_states_that_sdxl_and_clip_skip_read() -> None:
    pipe = tiny_pipeline()
    ids = pipe.tokenizer(["a circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():  # a first call: transformers 5 installs its hidden-state recorders now, before the hook
        base = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
    hook(pipe).apply(pipe)
    with torch.no_grad():
        hooked = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(hooked, base, atol=1e-4), "the recorded layer output must be the hooked one"


def test_project_out_removes_the_component_along_the_directions() -> None:
    torch.manual_seed(5)
    directions, mean, hidden = torch.randn(2, 16), torch.randn(16), torch.randn(3, 7, 16)
    basis = torch.linalg.qr(directions.T.double())[0].float()
    out = project_out({"directions": directions}, {}, 16)(hidden)
    assert (out @ basis).abs().max() < 1e-5 and torch.allclose(out + (hidden @ basis) @ basis.T, hidden, atol=1e-5)
    centred = project_out({"directions": directions, "mean": mean}, {}, 16)(hidden)
    assert ((centred - mean) @ basis).abs().max() < 1e-5
    assert torch.equal(project_out({"directions": directions}, {"scale": 0}, 16)(hidden), hidden)


BAD_HOOKS = {
    "layer out of range": ({"layer": 4}, "has 1 layers"),
    "missing encoder": ({"encoder": "text_encoder_2"}, "does not have"),
    "unknown type": ({"hook_type": "nope"}, "unknown hook type"),
    "wrong width": ({"tensors": {"directions": torch.randn(1, 15)}}, "k x 16"),
    "dependent directions": ({"tensors": {"directions": torch.ones(2, 16)}}, "linearly dependent"),
    "bad scale": ({"settings": {"scale": 5}}, "scale must be"),
}


@pytest.mark.parametrize("case", list(BAD_HOOKS))
def test_bad_hook_is_refused_in_one_line(case: str) -> None:
    pipe = tiny_pipeline()
    change, message = BAD_HOOKS[case]
    args = {"hook_type": "project-out", "tensors": {"directions": torch.randn(1, 16)}, "layer": 0, **change}
    with pytest.raises(ErasekitError, match=message) as err:
        hook_result(pipe, **args)
    assert "\n" not in str(err.value) and not installed(pipe)


def test_weights_delta_cannot_be_taken_off() -> None:
    pipe = tiny_pipeline()
    result = te_weights(pipe)
    result.apply(pipe)
    with pytest.raises(ErasekitError, match="load the base model again"):
        result.remove(pipe)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_evaluation_gives_a_callers_pipeline_back_as_it_was(kind: str) -> None:
    from erasekit.eval.targets import kept_as_it_was

    pipe = tiny_pipeline()
    result, before, out = MAKERS[kind](pipe), state(pipe), encoded(pipe)
    with kept_as_it_was(pipe, result):
        result.apply(pipe)
    assert same_state(state(pipe), before) and not installed(pipe) and torch.equal(encoded(pipe), out)


def test_a_hooked_pipeline_does_not_reuse_the_base_models_cached_images(tmp_path: Path) -> None:
    from erasekit.eval.generate import GenerationCache, generate_cached

    pipe, cache = tiny_pipeline(), GenerationCache(tmp_path)
    base = generate_cached(pipe, ["a circle"], [0], cache, steps=2)
    hook(pipe).apply(pipe)
    hooked = generate_cached(pipe, ["a circle"], [0], cache, steps=2)
    assert hooked.generated == 1 and hooked.paths != base.paths and not np.array_equal(hooked.images, base.images)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_evaluate_scores_each_kind_on_a_callers_pipeline_and_gives_it_back(kind: str, tiny_dir: Path, tmp_path: Path) -> None:
    from erasekit.models import load_pipeline
    from erasekit.world.judge import Judge
    from erasekit.world.vocab import load_vocab

    torch.manual_seed(0)
    vocab = load_vocab()
    Judge(len(vocab.objects), len(vocab.colours), len(vocab.styles)).eval().save(tmp_path / "judge")
    pipe = load_pipeline(str(tiny_dir))  # a pipeline that knows its name (the evaluation record needs one)
    result, before = MAKERS[kind](pipe), state(pipe)
    out = erasekit.evaluate(result, "toy-implicit", model=pipe, images_per_class=1, steps=1, cache_dir=tmp_path / "c", judge=str(tmp_path / "judge"))
    assert out["generated"]["erased"] == out["generated"]["base"] > 0, f"the {kind} delta's images must not come from the base's cache"
    assert out["model_hash"]["erased"] != out["model_hash"]["base"]
    assert same_state(state(pipe), before) and not installed(pipe)


@pytest.mark.parametrize("kind", ["weights", "hook"])
def test_cli_generate_applies_a_text_encoder_delta_or_hook(kind: str, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.sampling
    from erasekit.cli import app

    made: list[np.ndarray] = []
    real = erasekit.sampling.generate

    def recording(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(erasekit.sampling, "generate", recording)
    delta = MAKERS[kind](tiny_pipeline()).save(tmp_path / f"{kind}.safetensors")
    grid = tmp_path / "grid.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "-p", "a circle", "--delta", str(delta),
                                   "--out", str(grid), "--images", "1", "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert grid.is_file() and len(made) == 2
    assert not np.array_equal(made[0], made[1]), f"the {kind} delta must change the erased panel"
