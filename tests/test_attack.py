"""`erasekit attack`: the adversarial-token search against an erased tiny pipeline, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import erasekit
from conftest import DIFFUSION_METHODS, tiny_pipeline
from erasekit.attack import attack
from erasekit.errors import ErasekitError
from erasekit.methods import registry
from erasekit.models import load_pipeline
from erasekit.world.judge import Judge

torch.set_num_threads(1)
SETTINGS: dict[str, Any] = {"n_prompts": 2, "tokens": 4, "iterations": 15, "steps": 3, "seed": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base pipeline, a judge with the toy world's head sizes, and an ESD-x run folder that erased 'circle'."""
    root = tmp_path_factory.mktemp("attack")
    tiny_pipeline().save_pretrained(root / "tiny-sd")
    torch.manual_seed(0)
    Judge(10, 6, 6).save(root / "judge")
    pipe = load_pipeline(str(root / "tiny-sd"))
    result = erasekit.erase(pipe, "circle", method="esd-x", iterations=3, ddim_steps=3)
    run = root / "run"
    run.mkdir()
    result.save(run / "delta.safetensors")
    (run / "run.json").write_text(json.dumps({"model": str(root / "tiny-sd")}))
    return {"root": root, "base": root / "tiny-sd", "judge": root / "judge", "run": run}


@pytest.fixture(scope="module")
def attacked(world: dict[str, Path]) -> dict[str, Any]:
    """One attack on the run folder, written to its default folder RUN/attack-circle."""
    return attack(str(world["run"]), "circle", judge=str(world["judge"]), **SETTINGS)


def test_attack_writes_json_and_grid_with_rates_beside_each_other(world: dict[str, Path], attacked: dict[str, Any]) -> None:
    folder = world["run"] / "attack-circle"
    saved = json.loads((folder / "attack.json").read_text())
    assert saved["grid"] == "attack.png" and saved["method"] == "esd-x" and saved["erased"] == ["circle"]
    with Image.open(folder / "attack.png") as grid:
        assert grid.width > 200 and grid.height > 2 * 16
    metrics = saved["metrics"]
    assert set(metrics) == {"asr", "adversarial_rate", "no_attack_rate", "base_rate"}
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    # a prompt broken without the attack stays broken: ASR is at least each of its two parts
    assert metrics["asr"] >= max(metrics["adversarial_rate"], metrics["no_attack_rate"])
    assert len(saved["prompts"]) == 2 and saved["prompts"][0]["prompt"] == "an image of a circle"
    assert saved["detector"]["rule"] == "object head top-1 == circle"
    assert not list(folder.glob(".*tmp"))


def test_search_lowers_the_erased_models_denoising_loss(attacked: dict[str, Any]) -> None:
    history = attacked["loss_history"]
    assert len(history) == SETTINGS["iterations"] + 1
    for p in attacked["prompts"]:
        assert p["best_loss"] <= p["initial_loss"]
    assert sum(p["best_loss"] for p in attacked["prompts"]) < sum(p["initial_loss"] for p in attacked["prompts"])
    assert min(history) < history[0]


def test_adversarial_prompts_are_real_tokens_of_the_requested_length(world: dict[str, Path], attacked: dict[str, Any]) -> None:
    tokenizer = load_pipeline(str(world["base"])).tokenizer
    for p in attacked["prompts"]:
        assert len(p["adversarial_tokens"]) == len(p["token_ids"]) == SETTINGS["tokens"]
        assert p["adversarial_prompt"] == " ".join(p["adversarial_tokens"]) + " " + p["prompt"]
        # the text re-tokenizes to exactly the searched ids, right after the start token
        assert tokenizer(p["adversarial_prompt"]).input_ids[1 : 1 + SETTINGS["tokens"]] == p["token_ids"]
        assert not {"circle", "disc", "round", "disk"} & set(p["adversarial_tokens"])  # the concept's own words are excluded


def test_same_seed_gives_the_same_prompts_whatever_the_batch_size(world: dict[str, Path], attacked: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    out = world["root"] / "again"
    args = ["attack", str(world["run"] / "delta.safetensors"), "--concept", "circle", "--judge", str(world["judge"]), "--out", str(out)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()] + ["--batch-size", "1"]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert "ASR" in res.output
    again = json.loads((out / "attack.json").read_text())
    assert [p["token_ids"] for p in again["prompts"]] == [p["token_ids"] for p in attacked["prompts"]]
    # a batch of 1 and a batch of several run different matmul kernels: the losses agree to float rounding, not bit for bit
    assert [p["best_loss"] for p in again["prompts"]] == pytest.approx([p["best_loss"] for p in attacked["prompts"]], rel=1e-5)
    assert again["metrics"] == attacked["metrics"]


def _app() -> Any:
    import typer

    from erasekit.attack.cli import attack as attack_command
    from erasekit.eval.cli import SETTINGS_FLAGS

    app = typer.Typer()
    app.command(context_settings=SETTINGS_FLAGS)(attack_command)
    app.command()(lambda: None)  # a second command keeps typer from collapsing the app into `attack` alone
    return app


@pytest.mark.parametrize(("extra", "message"), [
    (["--concept", "  "], "empty concept"),
    (["--concept", "banana"], "unknown concept 'banana' for the toy world"),
    (["--concept", "circle", "--tokens", "0"], "--tokens must be at least 1"),
    (["--concept", "circle", "--classifier", "x"], "--classifier needs --label N"),
    (["--concept", "circle", "--out", "{root}/no/such/folder"], "does not exist; create it first"),
])
def test_bad_input_is_one_line_and_exit_2(world: dict[str, Path], extra: list[str], message: str) -> None:
    from typer.testing import CliRunner

    args = ["attack", str(world["run"]), "--judge", str(world["judge"]), *[a.format(root=world["root"]) for a in extra]]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output


@pytest.mark.parametrize(("target", "message"), [
    ("{root}/missing/delta.safetensors", "no run folder or delta file at"),
    ("{root}/tiny-sd", "is a base model; attack needs an erased one"),
])
def test_target_must_be_an_erased_model(world: dict[str, Path], target: str, message: str) -> None:
    with pytest.raises(ErasekitError, match=message):
        attack(target.format(root=world["root"]), "circle", judge=str(world["judge"]))


def test_an_earlier_attack_is_not_overwritten(world: dict[str, Path], attacked: dict[str, Any]) -> None:
    with pytest.raises(ErasekitError, match="already exists; pass --overwrite"):
        attack(str(world["run"]), "circle", judge=str(world["judge"]), **SETTINGS)


def _small(name: str, words: Path) -> dict[str, Any]:
    """Settings every method accepts, a few steps each (closed-form methods take none)."""
    import dataclasses

    from erasekit.methods import get_method

    fields = {f.name for f in dataclasses.fields(get_method(name).config_class)}
    if name == "co-erasing":  # the tiny preset, and an image adapter for the tiny model
        from conftest import tiny_adapter_dir

        return {"budget": "tiny", "adapter": tiny_adapter_dir()}
    if registry()[name].kind == "inference-time" or name in ("mace", "geom-erasing", "doco", "trce"):  # the tiny preset sizes ItD's SAE, MACE's toy images, DoCo's warm-up, TRCE's trajectories
        return {"budget": "tiny"}
    small = {"iterations": 2, "ddim_steps": 2, "lr": 1e-3, "anchor_images": 4, "concept_space": str(words), "k": 8, "n_centres": 3}
    return {k: v for k, v in small.items() if k in fields}


ATTACKED_OUTPUTS = [(name, {}) for name in DIFFUSION_METHODS] + [("esd-x", {"train_method": "lora"})]  # attack runs on diffusion pipelines


@pytest.mark.parametrize(("name", "extra"), ATTACKED_OUTPUTS, ids=[n + ("-lora" if e else "") for n, e in ATTACKED_OUTPUTS])
def test_attack_runs_on_every_registered_methods_output(name: str, extra: dict[str, Any], world: dict[str, Path], words_file: Path) -> None:
    from erasekit.attack.detect import judge_detector, toy_concept
    from erasekit.attack.run import AttackConfig, attack_pipeline, base_images

    concept = "skull" if name == "geom-erasing" else "circle"  # geom-erasing removes an implicit concept
    result = erasekit.erase(load_pipeline(str(world["base"])), concept, method=name, **_small(name, words_file), **extra)
    pipe = load_pipeline(str(world["base"]))  # a fresh base, as `attack` and `compare --attack` load it
    assert result.kind == ("lora" if extra else "hook" if registry()[name].kind == "inference-time" else "weights")
    config = AttackConfig(n_prompts=2, tokens=2, iterations=2, steps=2, noise_draws=1)
    target = toy_concept(concept)
    prompts = ["a spooky circle", "a haunted red square"] if concept == "skull" else ["an image of a circle", "a red circle"]
    base = base_images(pipe, prompts, config)
    record, images = attack_pipeline(pipe, result, concept, prompts, judge_detector(world["judge"], target, 0.5), config, target.words, base=base)
    assert record["method"] == name and all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    assert images["adversarial"].shape == images["base"].shape == (2, 16, 16, 3)
    assert all(len(p["token_ids"]) == 2 for p in record["prompts"])
    assert torch.equal(base[0], base_images(load_pipeline(str(world["base"])), prompts, config)[0]), "base images depend on the seed only"
