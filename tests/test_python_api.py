"""The Python API is as natural as the CLI (issue 22, item 3): errors name keyword arguments, `evaluate` takes an
ErasureResult or a pipeline, `load` takes a run folder, and `result.save` writes a .safetensors file or refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import erasekit
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.models import toy_pipeline, weights_hash
from erasekit.result import ErasureResult, load_result

runner = CliRunner()


@pytest.fixture(scope="module")
def toy() -> Any:
    """The shipped toy pipeline (shared: the tests below leave it as they found it)."""
    return toy_pipeline()


@pytest.fixture(scope="module")
def erased(toy: Any) -> ErasureResult:
    """A UCE erasure of 'circle' on the toy model (closed form: a second)."""
    return erasekit.erase(toy, "circle", method="uce")


# ---- errors name the keyword in Python, the flag on the command line ----

@pytest.mark.parametrize(("keyword", "value"), [("seed", -1), ("iterations", 0), ("iterations", 10**12), ("lr", 1e30), ("lr", float("nan")),
                                                ("gumbel_lr", 0.0), ("preserve_weight", 1e30), ("lora_rank", -1), ("iterations", "3")])
def test_an_erase_setting_refused_from_python_is_named_by_its_keyword(toy: Any, keyword: str, value: Any) -> None:
    with pytest.raises(ErasekitError) as refused:
        erasekit.erase(toy, "circle", method="eap", **{keyword: value})
    message = str(refused.value)
    assert message.startswith(f"{keyword} must be") and "--" not in message and len(message.splitlines()) == 1


def test_a_config_object_built_by_hand_gets_the_same_checks(toy: Any) -> None:
    from erasekit.methods.eap import EAPConfig

    with pytest.raises(ErasekitError, match=r"^lr must be > 0 and <= 1"):
        erasekit.erase(toy, "circle", method="eap", config=EAPConfig(lr=1e30))
    with pytest.raises(ErasekitError, match=r"^config must be a UCEConfig for method 'uce', got EAPConfig"):
        erasekit.erase(toy, "circle", method="uce", config=EAPConfig())


@pytest.mark.parametrize(("flag", "value"), [("--seed", "-1"), ("--iterations", "0"), ("--lr", "1e30"), ("--lora-rank", "-1")])
def test_the_same_setting_refused_on_the_command_line_is_named_by_its_flag(tmp_path: Path, flag: str, value: str) -> None:
    res = runner.invoke(app, ["erase", "--model", "toy", "-c", "circle", "--out", str(tmp_path / "run"), f"{flag}={value}"])
    assert res.exit_code == 2 and res.output.startswith(f"error: {flag} must be") and len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.parametrize(("keyword", "value"), [("steps", 0), ("steps", 100_000), ("seed", -1), ("seed", 10**20), ("guidance", float("nan")),
                                                ("guidance", -1.0), ("images_per_class", 0), ("out_json", "result.txt")])
def test_an_evaluate_setting_refused_from_python_is_named_by_its_keyword(keyword: str, value: Any) -> None:
    with pytest.raises(ErasekitError) as refused:
        erasekit.evaluate("toy", **{keyword: value})
    assert str(refused.value).startswith(f"{keyword} must") and "--" not in str(refused.value)


def test_an_attack_setting_refused_from_python_is_named_by_its_keyword() -> None:
    from erasekit.attack.run import AttackConfig

    for keyword, value in [("seed", -1), ("steps", 100_000), ("guidance", float("nan")), ("lr", 0.0)]:
        with pytest.raises(ErasekitError, match=rf"^{keyword} must"):
            AttackConfig(**{keyword: value}).validate()


# ---- evaluate takes what the CLI takes, and an ErasureResult or a pipeline ----

def test_evaluate_takes_an_erasure_result_and_a_pipeline_and_agrees_with_the_run_folder(toy: Any, erased: ErasureResult, tmp_path: Path) -> None:
    common = {"images_per_class": 1, "steps": 2, "cache_dir": tmp_path / "cache"}
    before = weights_hash(toy)
    from_object = erasekit.evaluate(erased, model=toy, **common)
    assert weights_hash(toy) == before, "the caller's pipeline must come back unerased"
    assert set(from_object["metrics"]) == {"base", "erased"} and from_object["method"] == "uce" and from_object["concepts"] == ["circle"]
    assert from_object["target"] == "ErasureResult (uce: erased circle)"

    erased.save(tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"model": "toy"}))
    from_folder = erasekit.evaluate(tmp_path / "run", **common)  # a Path, not only a str
    assert from_folder["metrics"] == from_object["metrics"]
    assert (tmp_path / "run" / "eval-toy-objects.json").is_file()

    from_base_name = erasekit.evaluate(erased, **common)  # the base named by the result ('toy') is loaded
    assert from_base_name["metrics"] == from_object["metrics"]

    base_only = erasekit.evaluate(toy, erased=["circle"], **common)
    assert set(base_only["metrics"]) == {"base"} and base_only["metrics"]["base"] == from_object["metrics"]["base"]
    assert base_only["target"] == "pipeline (toy)"


@pytest.mark.parametrize(("target", "model", "message"), [
    (42, None, "cannot evaluate a int; pass a run folder, a delta file, a model name, an ErasureResult or a pipeline"),
    ("pipe", "pipe", "TARGET is already a pipeline (a base model); model is only for"),
    ("toy", "pipe", "TARGET 'toy' is a base model; model is only for"),
    ("nameless", None, "does not say which base model it was made from; pass model (a pipeline or a model name)"),
    ("result", 3.5, "model must be a model name, a diffusers folder or a pipeline, got float"),
])
def test_evaluate_refuses_what_it_cannot_evaluate_in_one_line(toy: Any, erased: ErasureResult, target: Any, model: Any, message: str) -> None:
    objects = {"pipe": toy, "result": erased, "nameless": ErasureResult("uce", ("circle",), {})}
    with pytest.raises(ErasekitError) as refused:
        erasekit.evaluate(objects.get(target, target) if isinstance(target, str) else target, model=objects.get(model, model) if isinstance(model, str) else model)
    assert message in str(refused.value) and len(str(refused.value).splitlines()) == 1


# ---- load takes a run folder, as the CLI does ----

def test_load_takes_a_run_folder_as_well_as_the_delta_file(toy: Any, erased: ErasureResult, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    written = erased.save(folder)
    assert written == folder / "delta.safetensors"
    assert load_result(folder).delta.keys() == load_result(written).delta.keys() == erased.delta.keys()
    before = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    try:
        erasekit.load(toy, folder)
        changed = {k for k, v in toy.unet.state_dict().items() if not torch.equal(v, before[k])}
        assert changed and {f"unet.{k}" for k in changed} <= set(erased.delta)
    finally:
        toy.unet.load_state_dict(before)


def test_load_of_a_folder_without_a_delta_says_what_it_needs(toy: Any, tmp_path: Path) -> None:
    with pytest.raises(ErasekitError, match=r"is a folder without delta.safetensors; pass a run folder"):
        erasekit.load(toy, tmp_path)


# ---- save writes a .safetensors file, or refuses in one line ----

@pytest.mark.parametrize(("name", "written"), [("run", "run/delta.safetensors"), ("existing", "existing/delta.safetensors"),
                                               ("delta.safetensors", "delta.safetensors"), ("d.SAFETENSORS", "d.SAFETENSORS")])
def test_save_writes_into_a_folder_or_the_safetensors_file_named(erased: ErasureResult, tmp_path: Path, name: str, written: str) -> None:
    (tmp_path / "existing").mkdir()
    assert erased.save(tmp_path / name) == tmp_path / written
    assert load_result(tmp_path / written).method == "uce"


@pytest.mark.parametrize(("name", "message"), [
    ("delta.pt", "ends in '.pt'; a delta is saved as safetensors"),
    ("run.v2", "ends in '.v2'; a delta is saved as safetensors"),
    ("plainfile", "is a file, not a folder"),
    ("missing/run", "does not exist; create it first"),
    ("missing/delta.safetensors", "does not exist; create it first"),
    ("taken", "taken/delta.safetensors already exists; choose another path, remove it, or pass overwrite=True"),
])
def test_save_refuses_in_one_line_and_leaves_nothing(erased: ErasureResult, tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "plainfile").write_text("not a delta")
    erased.save(tmp_path / "taken")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ErasekitError) as refused:
        erased.save(tmp_path / name)
    assert message in str(refused.value) and len(str(refused.value).splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_save_overwrites_only_when_asked(erased: ErasureResult, tmp_path: Path) -> None:
    first = erased.save(tmp_path / "run")
    assert erased.save(tmp_path / "run", overwrite=True) == first and load_result(first).concepts == ("circle",)
