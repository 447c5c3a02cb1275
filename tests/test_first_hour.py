"""A new user's first hour (issue 22, items 4, 5 and 7): concepts that cannot be what was meant are refused before
anything loads, settings and run records tell the truth, and the report explains its numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import erasekit
from conftest import Loaded
from erasekit.cli import app
from erasekit.concepts import check_targets
from erasekit.errors import ErasekitError
from erasekit.eval.explain import MIN_FID_IMAGES, MIN_RATE_IMAGES, explain
from erasekit.methods import get_method, make_config
from erasekit.runs import partial_dir, write_request

runner = CliRunner()


def _one_error(res: Any) -> str:
    """The single `error:` line of a refused command (exit 2, no traceback)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


# ---- item 4: concepts that cannot be what the user meant ----

@pytest.mark.parametrize("concept", ["giraffe", "círculo", "red giraffe", "an image of a", "circle."])
def test_a_toy_concept_outside_the_vocabulary_is_refused_before_the_model_loads(concept: str, tmp_path: Path, no_model_load: None) -> None:
    res = runner.invoke(app, ["erase", "--model", "toy", "-c", concept, "--out", str(tmp_path / "run"), "--iterations", "1"])
    line = _one_error(res)
    assert repr(concept) in line and "circle, ring, moon" in line and "--allow-unknown" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("concept", ["circle", "Circle", "disc", "round disk", "five-pointed star", "six-sided shape", "an image of a circle",
                                     "striped", "polka-dot", "in checkered style", "red", "crimson", "a striped red circle with a skull",
                                     "skull", "spooky"])
def test_toy_synonyms_phrases_colours_and_styles_pass(concept: str, tmp_path: Path, no_model_load: None) -> None:
    check_targets([concept], toy=True)
    res = runner.invoke(app, ["erase", "--model", "toy", "-c", concept, "--out", str(tmp_path / "run"), "--iterations", "1"])
    assert isinstance(res.exception, Loaded), res.output  # every check passed: the model load was next


def test_allow_unknown_forces_an_unknown_toy_concept(tmp_path: Path, no_model_load: None) -> None:
    res = runner.invoke(app, ["erase", "--model", "toy", "-c", "giraffe", "--allow-unknown", "--out", str(tmp_path / "run")])
    assert isinstance(res.exception, Loaded), res.output


@pytest.fixture(scope="module")
def toy() -> Any:
    """The shipped toy pipeline (loaded once for this file)."""
    return erasekit.toy_pipeline()


def test_the_python_api_refuses_an_unknown_toy_concept_unless_allow_unknown(toy: Any) -> None:
    with pytest.raises(ErasekitError, match=r"'giraffe' is not something the toy world knows.*allow_unknown=True"):
        erasekit.erase(toy, "giraffe", method="esd-x", iterations=1, ddim_steps=1)
    result = erasekit.erase(toy, "giraffe", method="esd-x", iterations=1, ddim_steps=1, allow_unknown=True)
    assert result.concepts == ("giraffe",)


@pytest.mark.parametrize("model", ["toy", "tiny"])
def test_a_comma_asks_whether_two_concepts_were_meant(model: str, tiny_dir: Path, tmp_path: Path, no_model_load: None) -> None:
    name = "toy" if model == "toy" else str(tiny_dir)
    line = _one_error(runner.invoke(app, ["erase", "--model", name, "-c", "circle,ring", "--out", str(tmp_path / "run")]))
    assert "did you mean separate concepts?" in line and "--concept circle --concept ring" in line
    res = runner.invoke(app, ["erase", "--model", name, "-c", "circle,ring", "--allow-unknown", "--out", str(tmp_path / "run")])
    assert isinstance(res.exception, Loaded), res.output
    assert not (tmp_path / "run").exists()


def test_a_comma_from_python_names_the_keyword_argument(tiny: Any) -> None:
    with pytest.raises(ErasekitError, match=r"concepts=\['circle', 'ring'\].*allow_unknown=True"):
        erasekit.erase(tiny, "circle,ring", method="esd-x", iterations=1, ddim_steps=1)


@pytest.mark.parametrize("model, kept, says", [
    ("tiny", "circle", "is the erased 'circle'"),
    ("tiny", " Circle ", "is the erased 'circle'"),
    ("toy", "disc", "names the same toy object as the erased 'circle'"),
])
def test_a_concept_both_erased_and_preserved_is_refused(model: str, kept: str, says: str, tiny_dir: Path, tmp_path: Path, no_model_load: None) -> None:
    name = "toy" if model == "toy" else str(tiny_dir)
    line = _one_error(runner.invoke(app, ["erase", "--model", name, "-c", "circle", "--preserve", kept, "--out", str(tmp_path / "run")]))
    assert says in line and "drop it from --preserve" in line


def test_python_refuses_erasing_and_preserving_one_concept(tiny: Any) -> None:
    with pytest.raises(ErasekitError, match=r"preserve concept 'circle' is the erased 'circle'.*preserve="):
        erasekit.erase(tiny, "circle", method="esd-x", preserve=["circle"], iterations=1, ddim_steps=1)


@pytest.mark.parametrize("command", ["erase", "generate"])
def test_the_77_token_check_happens_before_the_model_loads(command: str, tiny_dir: Path, tmp_path: Path, no_model_load: None) -> None:
    long = "word " * 80
    args = (["erase", "-c", long, "--out", str(tmp_path / "run")] if command == "erase"
            else ["generate", "-p", long, "--out", str(tmp_path / "g.png")])
    line = _one_error(runner.invoke(app, [*args, "--model", str(tiny_dir)]))
    assert "tokens long" in line and "at most 77" in line
    assert list(tmp_path.iterdir()) == [tiny_dir]


@pytest.mark.parametrize("args, says", [
    (["-c", "giraffe"], "--concept 'giraffe' is not something the toy world knows"),
    (["-c", "circle", "--preserve", "disc"], "--preserve 'disc' names the same toy object as the erased 'circle'"),
    (["-c", "circle", "--preserve", "circle"], "drop it from --preserve"),
    (["-c", "circle,ring"], "--concept circle --concept ring"),
])
def test_compare_checks_its_concepts_as_erase_does_before_the_model_loads(args: list[str], says: str, tmp_path: Path, no_model_load: None) -> None:
    line = _one_error(runner.invoke(app, ["compare", *args, "--methods", "uce", "--out", str(tmp_path / "cmp")]))
    assert says in line, line
    assert list(tmp_path.iterdir()) == []


def test_compare_from_python_names_the_keyword_and_allow_unknown_lets_a_concept_through(tmp_path: Path, no_model_load: None) -> None:
    from erasekit.compare import compare_methods

    with pytest.raises(ErasekitError, match=r"concept 'giraffe' is not something the toy world knows.*allow_unknown=True"):
        compare_methods("toy", "giraffe", tmp_path / "cmp", methods=["uce"])
    res = runner.invoke(app, ["compare", "-c", "giraffe", "--allow-unknown", "--suite", "toy-objects", "--methods", "uce", "--out", str(tmp_path / "cmp")])
    assert isinstance(res.exception, Loaded), res.output  # every check passed: the base model's load was next
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keyword, value, says", [
    ("method", ["eap"], r"method must be one method's name \(a string\), got \['eap'\]; choose one of: .*eap, eap-pgd"),
    ("concepts", 5, r"concepts must be a string or a list of strings, got 5 \(int\)"),
    ("concepts", None, r"concepts must be a string or a list of strings, got None"),
    ("concepts", ["circle", 1], r"concepts must be a string or a list of strings; item 1 is 1 \(int\)"),
    ("preserve", 3, r"preserve must be a string or a list of strings, got 3"),
    ("preserve", [b"ring"], r"preserve must be a string or a list of strings; item 0 is b'ring'"),
    ("budget", ["toy"], r"budget must be a preset's name \(a string\) or None, got \['toy'\]; choose one of: paper, toy"),
    ("progress", "yes", r"progress must be a function progress\(step, total, record\) or None"),
    ("checkpoint", "runs/x", r"checkpoint must be an erasekit.methods.checkpoint.CheckpointSpec"),
    ("allow_unknown", "no", r"allow_unknown must be True or False, got 'no'"),
])
def test_python_arguments_of_the_wrong_type_are_one_line_naming_the_keyword(keyword: str, value: Any, says: str, tiny: Any) -> None:
    arguments: dict[str, Any] = {"concepts": "circle", "method": "uce", keyword: value}
    with pytest.raises(ErasekitError, match=says) as info:
        erasekit.erase(tiny, **arguments)
    assert "\n" not in str(info.value)


# ---- item 5: settings and records that tell the truth ----

@pytest.mark.parametrize("model, extra, budget", [
    ("toy", [], "toy"),
    ("toy", ["--budget", "paper"], "paper"),
    ("toy", ["--budget", "fast", "--iterations", "7"], "fast"),
    ("tiny", [], None),
])
def test_show_settings_prints_the_values_the_run_would_use(model: str, extra: list[str], budget: str | None, tiny_dir: Path) -> None:
    name = "toy" if model == "toy" else str(tiny_dir)
    res = runner.invoke(app, ["erase", "--model", name, "--method", "eap", "--show-settings", *extra])
    assert res.exit_code == 0, res.output
    shown = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines() if line.startswith("--")}
    overrides = {"iterations": 7} if "--iterations" in extra else {}
    expected = make_config(get_method("eap"), budget, **overrides)
    assert shown["--iterations"] == repr(expected.iterations) and shown["--lr"] == repr(expected.lr) and shown["--k"] == repr(expected.k)
    if budget == "toy":
        assert "(paper: 1000)" in next(line for line in res.stdout.splitlines() if line.startswith("--iterations"))


@pytest.fixture
def interrupted(tiny_dir: Path, tmp_path: Path) -> Path:
    """An erase that stopped before its first checkpoint: its request is recorded in OUT.partial/."""
    out = tmp_path / "run"
    cfg = make_config(get_method("esd-x"), None, iterations=2, ddim_steps=1)
    partial_dir(out).mkdir()
    argv = ["/usr/bin/erasekit", "erase", "--model", str(tiny_dir), "-c", "circle", "--method", "esd-x", "--out", str(out), "--iterations", "2"]
    import dataclasses

    write_request(partial_dir(out), {"model": str(tiny_dir), "family": None, "method": "esd-x", "concepts": ["circle"], "preserve": [],
                                     "device": "cpu", "config": dataclasses.asdict(cfg), "checkpoint_every": 1, "argv": argv})
    return out


@pytest.mark.parametrize("extra, flag", [
    (["--iterations", "5"], "--iterations"),
    (["--lr", "0.5"], "--lr"),
    (["--concept", "ring"], "--concept"),
    (["--method", "eap"], "--method"),
    (["--budget", "fast"], "--"),
])
def test_resume_with_other_settings_is_refused_naming_the_flag(interrupted: Path, extra: list[str], flag: str) -> None:
    line = _one_error(runner.invoke(app, ["erase", "--resume", str(interrupted), *extra]))
    assert line.startswith(f"error: {flag}") and "differs from the interrupted run's" in line
    assert (partial_dir(interrupted) / "request.json").is_file() and not interrupted.exists()


def test_resume_with_the_same_flags_finishes_and_run_json_keeps_the_original_command(interrupted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["erase", "--resume", str(interrupted), "--iterations", "2", "-c", "circle", "--method", "esd-x"]
    monkeypatch.setattr("sys.argv", ["erasekit", *args])
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads((interrupted / "run.json").read_text())
    assert record["command"].startswith("erasekit erase --model") and "--iterations 2" in record["command"]
    assert "--resume" in record["resumed_by"] and "--resume" not in record["command"]


def _eval_record(images_per_class: int, suite: str = "toy-objects") -> dict[str, Any]:
    """An evaluation record as `erasekit evaluate` writes it (no images generated: only what the report reads)."""
    groups = ["circle", "ring", "moon", "square"] if suite == "toy-objects" else ["a spooky red circle", "a haunted blue ring"]
    images = [{"prompt": f"an image of a {g}", "seed": 1000 * i + j, "group": g} for i, g in enumerate(groups) for j in range(images_per_class)]
    if suite == "toy-objects":
        base, erased = {"ESR-1": 0.0, "PSR-1": 100.0}, {"ESR-1": 90.0, "PSR-1": 80.0}
        comparison = {"FID vs base": 2.0, "FID vs base, erased": 5.0, "FID vs base, preserved": 1.0}
    else:
        base, erased, comparison = {"implicit@0.5": 60.0}, {"implicit@0.5": 10.0}, {"FID vs base": 2.0}
    return {"suite": suite, "method": "esd-x", "concepts": ["circle"], "erased": ["circle"] if suite == "toy-objects" else [],
            "metrics": {"base": {"headline": base}, "erased": {"headline": erased}}, "comparison": {"headline": comparison}, "images": images}


def test_report_refuses_to_overwrite_without_overwrite(tmp_path: Path) -> None:
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps(_eval_record(2)))
    out = tmp_path / "report.html"
    assert runner.invoke(app, ["report", str(ev), "--out", str(out)]).exit_code == 0
    before = out.read_bytes(), out.with_suffix(".md").read_bytes()
    line = _one_error(runner.invoke(app, ["report", str(ev), "--out", str(out)]))
    assert "already exists" in line and "--overwrite" in line
    assert (out.read_bytes(), out.with_suffix(".md").read_bytes()) == before
    out.unlink()  # the Markdown beside it alone is enough to refuse: both files are written or neither
    assert "report.md already exists" in _one_error(runner.invoke(app, ["report", str(ev), "--out", str(out)]))
    assert not out.exists()
    assert runner.invoke(app, ["report", str(ev), "--out", str(out), "--overwrite"]).exit_code == 0


def test_generate_creates_the_missing_folder_and_shows_progress(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "grid.png"
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "-p", "a circle", "--images", "2", "--steps", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "generate" in res.output and "2/2" in res.output


def test_generate_checks_the_delta_base_before_generating(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.sampling
    from conftest import tiny_pipeline

    other = tiny_pipeline(seed=3)
    result = erasekit.erase(other, "circle", method="esd-x", iterations=1, ddim_steps=1)
    result.save(tmp_path / "delta.safetensors")
    calls: list[int] = []
    monkeypatch.setattr(erasekit.sampling, "generate", lambda *a, **k: calls.append(1))
    out = tmp_path / "missing" / "grid.png"
    line = _one_error(runner.invoke(app, ["generate", "--model", str(tiny_dir), "-p", "a circle", "--delta", str(tmp_path / "delta.safetensors"),
                                          "--steps", "1", "--images", "1", "--out", str(out)]))
    assert "made for base" in line and calls == [] and not out.parent.exists()


# ---- item 7: the report explains itself; world render labels its grid ----

@pytest.mark.parametrize("images_per_class, rate_warning, fid_warning", [(2, True, True), (30, False, True), (130, False, False)])
def test_the_report_explains_each_metric_with_its_counts_and_warns_when_too_few(
    images_per_class: int, rate_warning: bool, fid_warning: bool, tmp_path: Path
) -> None:
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps(_eval_record(images_per_class)))
    html_path, md_path = erasekit.eval.report.write_report([ev], tmp_path / "report.html")
    text, md = html_path.read_text(), md_path.read_text()
    for words in ("erasure success rate", "preservation success rate", "Fréchet distance"):
        assert words in text and words in md
    erased, kept = images_per_class, 3 * images_per_class
    assert f"ESR-1: {erased} images per model (one evaluation seed per image)" in md
    assert f"PSR-1: {kept} images per model" in md and f"FID vs base: {4 * erased} images per model" in md
    assert (f"fewer than {MIN_RATE_IMAGES}" in md) == rate_warning
    assert (f"fewer than {MIN_FID_IMAGES}" in md) == fid_warning
    assert ("class='warn'" in text) == (rate_warning or fid_warning)


def test_the_implicit_rate_gets_the_ner_paragraph() -> None:
    [(text, counts, warnings)] = [e for e in explain([("run", _eval_record(10, "toy-implicit"))]) if "NER" in e[0]]
    assert "implicit@t" in text and counts == ["implicit@0.5: 20 images per model (one evaluation seed per image)"]
    assert warnings == ["too few images (implicit@0.5 on 20; fewer than 25): a rate from 20 images has a 95 % interval of about "
                        "±20 points near 50 %, too wide to tell methods apart; raise --images-per-class"]


@pytest.mark.parametrize("scale", [1, 3])
def test_world_render_labels_rows_and_columns(scale: int, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["world", "render", "--out", str(out), "--objects", "circle,ring", "--styles", "plain,striped", "--scale", str(scale)])
    assert res.exit_code == 0, res.output
    image = np.asarray(Image.open(out).convert("L"))
    pitch = (32 + 2) * scale
    bare_h, bare_w = 2 * pitch + 2 * scale, 12 * pitch + 2 * scale
    top, left = image.shape[0] - bare_h, image.shape[1] - bare_w
    assert top >= 14 and left >= 20  # room for the column and row names
    assert (image[:top, left:] < 128).any() and (image[top:, :left] < 128).any()  # text drawn there


def test_world_check_prints_one_plain_line_per_stage_in_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.world.check

    def check_world(*args: Any, **kwargs: Any) -> dict[str, Any]:  # the real one's stages, without its minutes of work
        progress = args[5]
        for step, stage in enumerate(["judge", "objects", "implicit", "timing", "pairs", "done"]):
            progress(stage, step, 5, {})
        return {"object_top1": 0.95}

    monkeypatch.setattr(erasekit.world.check, "check_world", check_world)
    res = runner.invoke(app, ["world", "check", "--json"])  # not a terminal: plain lines on stderr
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"object_top1": 0.95}  # stdout stays one JSON object
    lines = res.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == ["judge", "objects", "implicit", "timing", "pairs"], res.stderr
    assert all("1/1 (100%)" in line and "of 5" in line for line in lines)
