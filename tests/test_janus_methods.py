"""The autoregressive family's row of the method tables: every Janus method on a tiny random Janus, through ``erasekit.erase``,
the delta's save / load / apply path, and the CLI (`erase`, `generate`, and the commands that refuse Janus for now).

Diffusion methods have their own tables (test_methods.py, test_family_methods.py, test_attack.py); every registered
method is in exactly one of the two (the first test).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import erasekit
from conftest import DIFFUSION_METHODS, JANUS_METHODS, tiny_pipeline
from erasekit.autoregressive import Janus, generate, train_parameters
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.methods import make_config, registry
from erasekit.models import load_pipeline
from erasekit.result import load_result

runner = CliRunner()


def test_every_registered_method_is_in_exactly_one_family_table() -> None:
    import test_attack
    import test_family_methods

    for name in registry():
        assert (name in DIFFUSION_METHODS) + (name in JANUS_METHODS) == 1, f"{name} needs a row in exactly one family's table"
    assert JANUS_METHODS == ["ear"]
    assert {m for m, _ in test_family_methods.CASES} == set(DIFFUSION_METHODS) == {m for m, _ in test_attack.ATTACKED_OUTPUTS}
    assert not [m for m in JANUS_METHODS if registry()[m].checkpointable], "a checkpointable Janus method needs a resume test of its own"


def _janus(folder: Path) -> Janus:
    janus = load_pipeline(str(folder), autoregressive=True)
    assert isinstance(janus, Janus)
    return janus


def _state(janus: Janus) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in janus.model.state_dict().items()}


def _images(janus: Janus) -> np.ndarray:
    return generate(janus, ["a red circle", "a blue square"], [0, 1])


@pytest.mark.parametrize("method", JANUS_METHODS)
def test_janus_method_changes_only_its_parameters_and_leaves_the_model_unchanged(method: str, janus_dir: Path) -> None:
    janus = _janus(janus_dir)
    before = _state(janus)
    result = erasekit.erase(janus, "circle", method=method, budget="tiny")
    assert all(torch.equal(v, before[k]) for k, v in _state(janus).items()), "erase() must leave the model as it was"
    assert result.family == "janus" and result.method == method and result.kind == "weights" and result.base_hash
    result.apply(janus)
    changed = {k for k, v in _state(janus).items() if not torch.equal(v, before[k])}
    allowed = set(train_parameters(janus.model, make_config(registry()[method], "tiny").train_method))
    assert changed and changed <= allowed, sorted(changed - allowed)[:3]


@pytest.mark.parametrize("method", JANUS_METHODS)
def test_janus_method_is_deterministic_and_save_load_gives_identical_generations(method: str, janus_dir: Path, tmp_path: Path) -> None:
    first = erasekit.erase(_janus(janus_dir), "circle", method=method, budget="tiny")
    second = erasekit.erase(_janus(janus_dir), "circle", method=method, budget="tiny")
    assert first.delta.keys() == second.delta.keys() and all(torch.equal(first.delta[k], second.delta[k]) for k in first.delta)
    applied = _images(first.apply(_janus(janus_dir)))
    loaded = erasekit.load(erasekit.load_janus(janus_dir), first.save(tmp_path / "run"))  # the public path diffusion deltas take
    assert np.array_equal(_images(loaded), applied)
    assert load_result(tmp_path / "run").family == "janus"


def test_a_method_of_the_other_engine_and_a_delta_of_the_other_family_are_refused_in_one_line(janus_dir: Path) -> None:
    janus, sd = _janus(janus_dir), tiny_pipeline()
    cases = [
        (lambda: erasekit.erase(sd, "circle", method="ear"), "ear erases autoregressive models (janus); this is a SD 1.x/2.x diffusion pipeline"),
        (lambda: erasekit.erase(janus, "circle", method="esd-x"), "esd-x erases diffusion pipelines (sd, sdxl, sd3, flux); this is a Janus (autoregressive) model: use ear"),
    ]
    janus_delta = erasekit.erase(janus, "circle", method="ear", budget="tiny")
    sd_delta = erasekit.erase(sd, "circle", method="esd-x", iterations=1, ddim_steps=2)
    cases += [(lambda: janus_delta.apply(tiny_pipeline()), "made on a janus model and cannot load into this sd"),
              (lambda: sd_delta.apply(janus), "made on a sd model and cannot load into a Janus model")]
    before = _state(janus)
    for call, message in cases:
        with pytest.raises(ErasekitError, match=re.escape(message)) as info:
            call()
        assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in _state(janus).items())
    with pytest.raises(ErasekitError, match="hash to"):  # a Janus delta on another Janus base (other weights)
        janus_delta.apply(_other_janus(janus_dir.parent / "other"))


def _other_janus(folder: Path) -> Janus:
    from erasekit.autoregressive.tiny import build_tiny_janus

    return _janus(folder if folder.is_dir() else build_tiny_janus(folder, seed=1))


def test_load_pipeline_loads_a_janus_folder_only_where_asked_and_resolves_toy_janus(janus_dir: Path, tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.models as models

    with pytest.raises(ErasekitError, match="is a Janus .autoregressive. model, which this command does not support yet"):
        load_pipeline(str(janus_dir))
    with pytest.raises(ErasekitError, match="--family sd contradicts"):
        load_pipeline(str(janus_dir), family="sd", autoregressive=True)
    assert models.model_family(str(janus_dir)) == "janus" and models.model_family("toy") == "sd"
    monkeypatch.setattr(models, "toy_janus_dir", lambda: tmp_path / "absent")
    with pytest.raises(ErasekitError, match=r"^the toy Janus is not shipped in this install; train it with `erasekit world"):
        load_pipeline("toy-janus", autoregressive=True)
    monkeypatch.setattr(models, "toy_janus_dir", lambda: janus_dir)
    toy = load_pipeline("toy-janus", autoregressive=True)
    assert isinstance(toy, Janus) and models.model_id(toy) == "toy-janus"


# ---- the command line ---------------------------------------------------------------------------------------------

def _one_error(res) -> str:  # type: ignore[no-untyped-def]
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def janus_run(janus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("janus-cli") / "run"
    res = runner.invoke(app, ["erase", "--model", str(janus_dir), "-c", "circle", "--method", "ear", "--budget", "tiny", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_cli_erase_then_generate_on_a_janus_folder(janus_run: Path, janus_dir: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in janus_run.iterdir()) == ["delta.safetensors", "history.json", "run.json"]
    result = load_result(janus_run)
    assert result.method == "ear" and result.family == "janus" and result.concepts == ("circle",)
    grid = tmp_path / "grid.png"
    res = runner.invoke(app, ["generate", "--model", str(janus_dir), "-p", "a red circle", "--images", "2", "--delta", str(janus_run), "--out", str(grid)])
    assert res.exit_code == 0 and grid.is_file(), res.output
    base = tmp_path / "base.png"
    assert runner.invoke(app, ["generate", "--model", str(janus_dir), "-p", "a red circle", "--out", str(base), "--guidance", "3"]).exit_code == 0


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "-p", "a circle", "--steps", "3"], "--steps sets a diffusion sampler's steps"),
    (["generate", "-p", "a circle", "--image-prompt", "x.png"], "--image-prompt and --image-adapter prompt a diffusion pipeline"),
    (["generate", "-p", "a circle", "--family", "sd"], "--family sd contradicts"),
    (["erase", "-c", "circle", "--method", "esd-x"], "esd-x erases diffusion pipelines"),
    (["erase", "-c", "circle", "--method", "esd-u"], "ESD's objective on image tokens is `ear --no-windowed --no-masking`"),
    (["erase", "-c", "circle", "--method", "eap"], "EAP's adversarial preservation on token predictions is not built yet"),
    (["erase", "-c", "circle", "--method", "ear", "--window-size", "17"], "window_size 17 is larger than the image's 16 tokens"),
    (["evaluate", "--steps", "3"], "--steps sets a diffusion sampler's steps"),
    (["compare", "-c", "circle", "--methods", "uce"], "uce erases diffusion pipelines"),
    (["compare", "-c", "circle", "--methods", "ear", "--steps", "3"], "--steps sets a diffusion sampler's steps"),
    (["compare", "-c", "circle", "--methods", "ear", "--attack", "--attack-set", "steps=3"], "sampler's steps"),
    (["compare", "-c", "circle", "--methods", "ear", "--attack", "--attack-set", "noise_draws=2"], "noise_draws"),
])
def test_cli_refuses_what_makes_no_sense_on_janus_in_one_line(args: list[str], message: str, janus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    model = [str(janus_dir)] if args[0] == "evaluate" else ["--model", str(janus_dir)]
    outs = {"generate": ["--out", str(out / "g.png")], "erase": ["--out", str(out / "run")], "compare": ["--out", str(out / "cmp")], "evaluate": []}
    assert message in _one_error(runner.invoke(app, [args[0], *model, *args[1:], *outs[args[0]]]))
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_cli_refuses_ear_on_diffusion_models_and_janus_runs_in_diffusion_commands(janus_run: Path, tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.models as models

    line = _one_error(runner.invoke(app, ["erase", "--model", "toy", "-c", "circle", "--method", "ear", "--out", str(tmp_path / "run")]))
    assert "ear erases autoregressive models (janus)" in line
    assert "ear erases autoregressive models (janus)" in _one_error(
        runner.invoke(app, ["compare", "-c", "circle", "--methods", "ear", "--out", str(tmp_path / "cmp")]))
    # `attack` runs on a Janus run now (test_janus_attack.py)
    monkeypatch.setattr(models, "toy_janus_dir", lambda: tmp_path / "absent")
    assert "the toy Janus is not shipped in this install" in _one_error(
        runner.invoke(app, ["erase", "--model", "toy-janus", "-c", "circle", "--method", "ear", "--out", str(tmp_path / "run")]))
    assert not list(tmp_path.iterdir())


def test_methods_lists_ear_under_the_janus_family() -> None:
    lines = runner.invoke(app, ["methods"]).output.splitlines()
    header, ear = lines[0].split(), next(line.split() for line in lines if line.startswith("ear "))
    assert header[2:7] == ["sd", "sdxl", "sd3", "flux", "janus"]
    assert ear[2:7] == ["-", "-", "-", "-", "yes"]


def test_show_settings_of_a_janus_method_needs_no_janus_model_while_a_run_on_the_toy_model_is_refused(tmp_path: Path) -> None:
    shown = CliRunner().invoke(app, ["erase", "--method", "ear", "--show-settings"])
    assert shown.exit_code == 0, shown.output
    assert "--window-size" in shown.output and "--threshold" in shown.output
    refused = CliRunner().invoke(app, ["erase", "--method", "ear", "-c", "circle", "--out", str(tmp_path / "run")])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1 and "autoregressive" in refused.output
    assert not (tmp_path / "run").exists()
