"""Every fine-tuning method on every family it declares, on tiny random models saved to a folder (one row each).

A new method or family is one more row: the table is built from the registry's capabilities and each
method's ``tiny`` preset, as peft's TEST_CASES are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import erasekit
from conftest import DIFFUSION_METHODS, tiny_adapter
from erasekit.errors import ErasekitError
from erasekit.families import family_of
from erasekit.families.tiny import build_tiny
from erasekit.methods import registry
from erasekit.models import load_pipeline
from erasekit.result import load_result

CASES = [(m, f) for m in DIFFUSION_METHODS for f in registry()[m].families]  # Janus: test_janus_methods.py
CONCEPT = {"geom-erasing": "skull"}  # an implicit concept: its tiny preset trains on the toy world's renders, which carry the skull


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny(f, root / f) for f in ("sd", "sdxl", "sd3", "flux")}


def _images(pipe: object) -> np.ndarray:
    return family_of(pipe).generate(pipe, ["a red circle"], [0], steps=2, guidance=3.0)


def _state(pipe: object) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in family_of(pipe).denoiser(pipe).state_dict().items()}


@pytest.mark.parametrize("method, family", CASES)
def test_method_runs_on_family_and_changes_only_its_parameters(method: str, family: str, folders: dict, tmp_path: Path) -> None:
    pipe = load_pipeline(str(folders[family]))
    assert family_of(pipe).name == family
    before = _state(pipe)
    extra = {"adapter": str(tiny_adapter(pipe.unet, tmp_path / "adapter"))} if method == "co-erasing" else {}  # stage 2 prompts with images
    result = erasekit.erase(pipe, CONCEPT.get(method, "circle"), method=method, budget="tiny", **extra)
    assert result.family == family and all(torch.equal(v, before[k]) for k, v in _state(pipe).items()), "the pipeline was left changed"
    fam = family_of(pipe)
    prefix = "unet." if family in ("sd", "sdxl") else "transformer."
    changed = {k.removeprefix(prefix) for k in result.weights}  # the weights it changes (a hook it also carries aside)
    if method == "geom-erasing":  # fine-tuned weights that carry the negative prompt of the places it found
        assert result.kind == "weights" and result.hook["type"] == "negative-prompt" and "skull at the top right" in result.hook["settings"]["prompt"]
    if registry()[method].kind == "inference-time":  # no weight changes: a hook on a text-encoder layer, which changes the images
        assert result.kind == "hook" and not set(result.delta) & set(before)
        assert not np.array_equal(_images(load_pipeline(str(folders[family]))), _images(result.apply(load_pipeline(str(folders[family])))))
    elif registry()[method].kind == "text-encoder":  # the text encoder's chosen layers; the images change through them
        from erasekit.methods.te_model import te_parameters

        assert result.delta and all(k.startswith("text_encoder.") for k in result.delta)
        named = set(te_parameters(pipe.text_encoder, result.config["te_layers"]))
        assert {k.removeprefix("text_encoder.") for k in result.delta} == named
        assert not np.array_equal(_images(load_pipeline(str(folders[family]))), _images(result.apply(load_pipeline(str(folders[family])))))
    elif method == "trce":  # stage 1's text-reading matrices, stage 2's self-attention and queries
        from erasekit.methods.trce import stage2_parameters

        assert changed == set(fam.closed_form_weights(fam.denoiser(pipe))) | set(stage2_parameters(pipe))
    elif registry()[method].kind == "closed-form" or method == "mace":  # the family's text-reading matrices (attn2.to_k/to_v), nothing else
        assert changed and changed == set(fam.closed_form_weights(fam.denoiser(pipe)))  # (MACE's fusion writes exactly these)
    elif result.config.get("kv_only"):  # CA's default: the text's keys and values within its train set
        assert changed and changed <= set(fam.parameters(fam.denoiser(pipe), result.config["train_method"]))
        assert all(any(kv in f".{k}" for kv in (".to_k.", ".to_v.", ".add_k_proj.", ".add_v_proj.")) for k in changed)
    else:
        assert changed == set(fam.parameters(fam.denoiser(pipe), result.config["train_method"]))
    assert result.kind == "hook" or registry()[method].kind == "text-encoder" or any(
        not torch.equal(result.delta[prefix + k], before[k]) for k in before if prefix + k in result.delta)
    # save -> load -> apply gives the same images as applying the result in memory
    path = result.save(tmp_path / "delta.safetensors")
    direct = _images(result.apply(load_pipeline(str(folders[family]))))
    reloaded = _images(load_result(path).apply(load_pipeline(str(folders[family]))))
    assert np.array_equal(direct, reloaded)


def _one_prediction(pipe: object) -> torch.Tensor:
    """The denoiser's output on a fixed latent, time and prompt (one forward: no sampler to amplify rounding)."""
    fam = family_of(pipe)
    x = fam.start_noise(pipe, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return fam.predict(fam.denoiser(pipe), x, torch.tensor([500.0]), fam.encode(pipe, ["a red circle"]))


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_lora_result_loads_with_the_familys_own_load_lora_weights(family: str, folders: dict, tmp_path: Path) -> None:
    pipe = load_pipeline(str(folders[family]))
    base = _one_prediction(pipe)
    result = erasekit.erase(pipe, "circle", method="esd-x", budget="tiny", train_method="lora", lr=1e-1)
    assert result.kind == "lora" and all(k.startswith(("unet.", "transformer.")) for k in result.delta)
    fresh = load_pipeline(str(folders[family]))
    fresh.load_lora_weights({k: v.clone() for k, v in result.delta.items()})  # the family's own loader
    with_lora = _one_prediction(fresh)
    assert (with_lora - base).abs().max() > 1e-4  # the adapter is active
    applied = _one_prediction(load_result(result.save(tmp_path / "lora.safetensors")).apply(load_pipeline(str(folders[family]))))
    assert torch.allclose(applied, with_lora, rtol=1e-4, atol=1e-4)  # fused into the weights == the live adapter


def test_a_delta_refuses_another_family_and_a_method_its_unsupported_family(folders: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from erasekit.methods import base

    sd = load_pipeline(str(folders["sd"]))
    result = erasekit.erase(sd, "circle", method="esd-x", budget="tiny")
    with pytest.raises(ErasekitError, match="made on a sd model and cannot load into this flux") as info:
        result.apply(load_pipeline(str(folders["flux"])))
    assert "\n" not in str(info.value)
    monkeypatch.setitem(base._REGISTRY, "uce", dataclasses.replace(registry()["uce"], families=("sd", "sdxl")))  # every method runs on every family
    with pytest.raises(ErasekitError, match="uce does not run on FLUX.1 models yet; it supports: sd"):
        erasekit.erase(load_pipeline(str(folders["flux"])), "circle", method="uce")
    with pytest.raises(ErasekitError, match="--family sdxl contradicts"):
        load_pipeline(str(folders["sd"]), family="sdxl")


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_cli_erase_generate_evaluate_on_a_saved_folder_of_each_family(family: str, folders: dict, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from erasekit.cli import app

    runner = CliRunner()
    model, run = str(folders[family]), tmp_path / "run"
    erased = runner.invoke(app, ["erase", "--model", model, "--concept", "circle", "--method", "eap", "--budget", "tiny", "--out", str(run)])
    assert erased.exit_code == 0, erased.output
    assert load_result(run / "delta.safetensors").family == family
    grid = runner.invoke(app, ["generate", "--model", model, "--delta", str(run), "--prompt", "a red circle", "--images", "1",
                               "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert grid.exit_code == 0, grid.output
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
    evaluated = runner.invoke(app, ["evaluate", str(run), "--suite", "toy-objects", "--images-per-class", "1", "--steps", "2",
                                    "--cache-dir", str(tmp_path / "cache")])
    assert evaluated.exit_code == 0, evaluated.output
    record = json.loads((run / "eval-toy-objects.json").read_text())
    assert set(record["metrics"]) == {"base", "erased"}
    forced = runner.invoke(app, ["erase", "--model", model, "--family", "flux" if family != "flux" else "sd", "--concept", "circle",
                                 "--budget", "tiny", "--out", str(tmp_path / "other")])
    assert forced.exit_code == 2 and "contradicts" in forced.stderr and not (tmp_path / "other").exists()
