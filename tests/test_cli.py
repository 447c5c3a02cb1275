"""The command line end to end on a tiny pipeline saved to a temp folder (typer's CliRunner)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.result import load_result

runner = CliRunner()
SMALL = ["--iterations", "3", "--ddim-steps", "3", "--k", "8", "--n-centres", "3"]


def _erase(tiny_dir: Path, out: Path, words: Path, *extra: str):
    return runner.invoke(app, ["erase", "--model", str(tiny_dir), "-c", "circle", "--method", "eap", "--out", str(out),
                               "--concept-space", str(words), *SMALL, *extra])


def test_version_and_methods() -> None:
    assert runner.invoke(app, ["--version"]).output.startswith("erasekit ")
    out = runner.invoke(app, ["methods"]).output
    assert all(name in out for name in ("eap", "eap-pgd", "esd-x", "esd-u"))


def test_erase_then_generate_with_the_delta(tiny_dir: Path, tmp_path: Path, words_file: Path) -> None:
    run = tmp_path / "run"
    res = _erase(tiny_dir, run, words_file)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in run.iterdir()) == ["delta.safetensors", "history.json", "run.json"]
    assert load_result(run / "delta.safetensors").config["iterations"] == 3
    grid = tmp_path / "grid.png"
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "-p", "a circle", "-p", "a ring", "--delta", str(run),
                              "--out", str(grid), "--images", "2", "--steps", "3"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    width, height = Image.open(grid).size
    assert width > 2 * 2 * 96 and height > 2 * 96


def test_toml_config_and_flags(tiny_dir: Path, tmp_path: Path, words_file: Path) -> None:
    cfg = tmp_path / "eap.toml"
    cfg.write_text("[eap]\niterations = 2\ngumbel_temperature = 1.5\n")
    res = _erase(tiny_dir, tmp_path / "run", words_file, "--config", str(cfg), "--gumbel-lr", "0.05")
    assert res.exit_code == 0, res.output
    config = load_result(tmp_path / "run" / "delta.safetensors").config
    # flags win over the file, the file over the defaults
    assert config["iterations"] == 3 and config["gumbel_temperature"] == 1.5 and config["gumbel_lr"] == 0.05


@pytest.mark.parametrize(
    "args, message",
    [
        (["-c", "  "], "empty concept"),
        (["-c", "circle", "--method", "nope"], "unknown method"),
        (["-c", "circle", "--bogus", "1"], "unknown option --bogus"),
        (["-c", "circle", "--k", "many"], "--k expects int"),
        (["-c", "circle", "--k", "5000"], "K=5000"),
        (["-c", "word " * 80], "tokens long"),
    ],
)
def test_bad_erase_input_exits_2_with_one_line_and_no_output(tiny_dir: Path, tmp_path: Path, words_file: Path, args: list[str], message: str) -> None:
    out = tmp_path / "run"
    res = runner.invoke(app, ["erase", "--model", str(tiny_dir), "--out", str(out), "--concept-space", str(words_file),
                              "--iterations", "2", "--ddim-steps", "2", "--k", "8", "--n-centres", "3", *args])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_models_and_existing_outputs(tiny_dir: Path, tmp_path: Path, words_file: Path) -> None:
    res = runner.invoke(app, ["erase", "--model", str(tmp_path / "nowhere"), "-c", "circle", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "no pipeline folder" in res.output
    (tmp_path / "plain").mkdir()
    res = runner.invoke(app, ["erase", "--model", str(tmp_path / "plain"), "-c", "circle", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "model_index.json" in res.output
    (tmp_path / "taken").mkdir()
    res = _erase(tiny_dir, tmp_path / "taken", words_file)
    assert res.exit_code == 2 and "already exists" in res.output


def test_delta_on_the_wrong_base_is_refused(tiny_dir: Path, tmp_path: Path, words_file: Path) -> None:
    from conftest import tiny_pipeline

    assert _erase(tiny_dir, tmp_path / "run", words_file).exit_code == 0
    other = tmp_path / "other-sd"
    tiny_pipeline(seed=7).save_pretrained(other)
    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["generate", "--model", str(other), "-p", "a circle", "--delta", str(tmp_path / "run"),
                              "--out", str(out), "--steps", "2", "--images", "1"])
    assert res.exit_code == 2 and "made for base" in res.output
    assert not out.exists()
