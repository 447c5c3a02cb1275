"""`erasekit evaluate` and `erasekit compare` on a Janus model (the tiny random one), and compare's method variants."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.autoregressive import load_janus
from erasekit.cli import app
from erasekit.eval.runner import evaluate

runner = CliRunner()
EVAL = ["--images-per-class", "1"]


def _one_error(res) -> str:  # type: ignore[no-untyped-def]
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


def test_evaluate_runs_on_a_janus_base_and_writes_its_record(janus_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "base.json"
    res = runner.invoke(app, ["evaluate", str(janus_dir), "--suite", "toy-objects", "--erased", "circle", "--judge", str(judge_dir),
                              "--cache-dir", str(tmp_path / "cache"), "--json", str(out), *EVAL])
    assert res.exit_code == 0, res.output
    record = json.loads(out.read_text())
    assert record["sampler"].startswith("janus") and record["settings"]["steps"] == 0 and record["settings"]["guidance"] == 5.0
    assert set(record["metrics"]) == {"base"} and record["erased"] == ["circle"] and record["generated"] == {"base": 10}
    assert {"ESR-1", "ESR-5", "PSR-1", "PSR-5"} <= set(record["metrics"]["base"]["headline"])
    assert out.with_suffix(".png").is_file()
    shown = runner.invoke(app, ["evaluate", str(janus_dir), "--show-settings"]).output
    assert "--steps                0" in shown and "--guidance             5.0" in shown


def test_evaluate_runs_on_an_ear_run_folder_base_and_erased(ear_run: Path, janus_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    assert json.loads((ear_run / "run.json").read_text())["model"] == str(janus_dir)
    res = runner.invoke(app, ["evaluate", str(ear_run), "--judge", str(judge_dir), "--cache-dir", str(tmp_path / "cache"), "--guidance", "3", *EVAL])
    assert res.exit_code == 0, res.output
    record = json.loads((ear_run / "eval-toy-objects.json").read_text())
    assert record["method"] == "ear" and record["model"] == str(janus_dir) and record["settings"]["guidance"] == 3.0
    assert set(record["metrics"]) == {"base", "erased"} and record["model_hash"]["base"] != record["model_hash"]["erased"]
    assert "FID vs base" in record["comparison"]["headline"]
    base = [np.asarray(Image.open(im["base"])) for im in record["images"]]
    erased = [np.asarray(Image.open(im["erased"])) for im in record["images"]]
    assert any(not np.array_equal(b, e) for b, e in zip(base, erased)), "the EAR delta must change the Janus's images"


def test_evaluate_on_janus_gives_the_same_metrics_whatever_the_batch_size(ear_run: Path, judge_dir: Path, tmp_path: Path) -> None:
    records = [evaluate(str(ear_run), "toy-synonyms", images_per_class=2, batch_size=b, judge=str(judge_dir), cache_dir=tmp_path / f"cache{b}")
               for b in (1, 7)]
    assert records[0]["metrics"] == records[1]["metrics"] and records[0]["generated"] == records[1]["generated"] == {"base": 20, "erased": 20}
    for model in ("base", "erased"):  # the same images, bit for bit
        assert all(np.array_equal(np.asarray(Image.open(a[model])), np.asarray(Image.open(b[model])))
                   for a, b in zip(records[0]["images"], records[1]["images"]))
    # FID of near-identical sets is sqrtm's rounding noise: equal to it
    assert records[0]["comparison"]["headline"] == pytest.approx(records[1]["comparison"]["headline"], abs=1e-5)


def test_evaluate_leaves_a_given_janus_as_it_was(ear_run: Path, janus_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    janus = load_janus(janus_dir)
    before = {k: v.clone() for k, v in janus.model.state_dict().items()}
    record = evaluate(ear_run, "toy-objects", model=janus, images_per_class=1, judge=str(judge_dir), cache_dir=tmp_path / "cache")
    assert set(record["metrics"]) == {"base", "erased"}
    assert all(torch.equal(v, before[k]) for k, v in janus.model.state_dict().items())


def test_compare_on_janus_runs_ear_and_a_variant_with_paired_seeds(janus_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", "--model", str(janus_dir), "-c", "circle", "--methods", "ear", "--variant", "esd-style=ear:no-windowed,masking=false",
                              "--set", "ear.iterations=2", "--budget", "tiny", "--seeds", "2", "--judge", str(judge_dir), "--in-process",
                              "--out", str(out), *EVAL])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "compare.json").read_text())
    assert summary["methods"] == ["ear", "esd-style"] and summary["variants"] == {"esd-style": {"method": "ear", "settings": {"windowed": False, "masking": False}}}
    rows = {row["method"]: row for row in summary["rows"]}
    assert set(rows) == {"ear", "esd-style"} and not any(row.get("error") for row in rows.values())
    assert [r["seed"] for r in rows["ear"]["per_seed"]] == [r["seed"] for r in rows["esd-style"]["per_seed"]] == [0, 1]
    for name, (windowed, masking) in {"ear": (True, True), "esd-style": (False, False)}.items():
        for seed in (0, 1):
            config = json.loads((out / f"{name}-seed{seed}" / "run.json").read_text())["config"]
            assert (config["windowed"], config["masking"], config["iterations"], config["seed"]) == (windowed, masking, 2, seed)
    assert {"ESR-1", "PSR-1"} <= set(rows["esd-style"]["intervals"]["toy-objects"])
    assert "Variants: esd-style = ear with windowed=False, masking=False." in (out / "compare.md").read_text()


def test_compare_variants_of_a_diffusion_method(tiny_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", "--model", str(tiny_dir), "-c", "circle", "--methods", "esd-x", "--variant", "esd-x-fast=esd-x:lr=1e-2",
                              "--set", "esd-x.iterations=2", "--set", "esd-x.ddim_steps=2", "--set", "esd-x-fast.ddim_steps=3", "--judge", str(judge_dir),
                              "--in-process", "--steps", "2", "--out", str(out), *EVAL])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "compare.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["esd-x", "esd-x-fast"] and summary["rows"][1]["variant_of"] == "esd-x"
    configs = {name: json.loads((out / name / "run.json").read_text())["config"] for name in ("esd-x", "esd-x-fast")}
    assert configs["esd-x-fast"]["lr"] == 1e-2 and configs["esd-x"]["lr"] != 1e-2
    assert (configs["esd-x"]["ddim_steps"], configs["esd-x-fast"]["ddim_steps"]) == (2, 3)
    assert configs["esd-x"]["iterations"] == configs["esd-x-fast"]["iterations"] == 2


@pytest.mark.parametrize(("variant", "message"), [
    ("ear-no-windows", "--variant expects NAME=METHOD[:SETTING,...]"),
    ("=ear:no-windowed", "--variant expects NAME=METHOD[:SETTING,...]"),
    ("x=ear:", "has no setting after ':'"),
    ("x=nosuch:lr=1", "unknown method 'nosuch'"),
    ("x=ear:no-such-key=3", "--variant x: unknown option --no-such-key"),
    ("x=ear:lr=fast", "--variant x:"),
    ("ear=ear:no-masking", "variant name 'ear' is a method's name"),
    ("Bad/Name=ear:no-masking", "variant name 'Bad/Name' must be lower-case letters"),
    ("x=esd-x:lr=1e-5", "esd-x erases diffusion pipelines"), ("logs=ear:no-masking", "is a folder every comparison has"),
    ("", "--variant expects"), ("=", "--variant expects"), ("x=", "--variant expects"), ("x=ear:,,", "has no setting after ':'"),
    ("x=ear:lr=nan", "lr"), ("x=ear:iterations=-1", "iterations"), ("x=ear:lr", "--variant x:"), ("x=ear:windowed=maybe", "--variant x:"),
])
def test_bad_variants_are_one_line_and_write_nothing(variant: str, message: str, janus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    line = _one_error(runner.invoke(app, ["compare", "--model", str(janus_dir), "-c", "circle", "--methods", "ear", "--variant", variant, "--out", str(out)]))
    assert message in line, line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_variant_given_twice_or_set_on_an_unknown_name_is_one_line(janus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    base = ["compare", "--model", str(janus_dir), "-c", "circle", "--out", str(out)]
    assert "--variant a is given twice" in _one_error(runner.invoke(app, [*base, "--variant", "a=ear:no-masking", "--variant", "a=ear:no-windowed"]))
    assert "names 'b', which is not being compared" in _one_error(runner.invoke(app, [*base, "--variant", "a=ear:no-masking", "--set", "b.lr=1"]))
    assert "ear erases autoregressive models" in _one_error(runner.invoke(app, [*base[:2], "toy", *base[3:], "--variant", "a=ear:no-masking"]))
    assert not list(tmp_path.iterdir())


def test_a_janus_judged_by_a_world_of_another_resolution_is_one_line(janus_dir: Path, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    res = runner.invoke(app, ["evaluate", str(janus_dir), *EVAL, *cache])  # the shipped judge's toy CLIP reads 32 x 32
    errors = [line for line in res.output.splitlines() if line.startswith("error")]
    assert res.exit_code == 2 and "Traceback" not in res.output and len(errors) == 1, res.output
    assert "the world's toy CLIP reads 32x32 images but the model drew 16x16" in errors[0]
    assert not (tmp_path / "out").exists()


def test_compare_on_toy_janus_defaults_to_the_janus_methods(janus_dir: Path, judge_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.models as models

    monkeypatch.setattr(models, "toy_janus_dir", lambda: janus_dir)  # the tiny Janus stands in for the shipped one
    out = tmp_path / "cmp"
    res = runner.invoke(app, ["compare", "--model", "toy-janus", "-c", "circle", "--budget", "tiny", "--judge", str(judge_dir), "--in-process",
                              "--attack", "--attack-set", "n_prompts=2", "--attack-set", "tokens=2", "--attack-set", "iterations=3",
                              "--out", str(out), *EVAL])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "compare.json").read_text())
    assert summary["methods"] == ["ear"] and summary["model"] == "toy-janus" and summary["suites"] == ["toy-objects"]
    assert json.loads((out / "ear" / "run.json").read_text())["model"] == "toy-janus"
    evaluation = json.loads((out / "ear" / "eval-toy-objects.json").read_text())
    assert evaluation["model"] == "toy-janus" and evaluation["sampler"].startswith("janus") and not summary["rows"][0].get("error")
    # --attack: the same attack as `erasekit attack` on the run (Janus-Pro's guidance, no sampler steps), its ASR in the row
    row = summary["rows"][0]
    assert not row.get("attack_error") and set(row["attack"]) == {"circle"} and 0 <= row["attack"]["circle"]["asr"] <= 100, row
    record = json.loads((out / "ear" / "attack-circle" / "attack.json").read_text())
    assert record["settings"]["guidance"] == 5.0 and record["settings"]["steps"] == 0 and len(record["prompts"]) == 2
    assert record["metrics"]["asr"] == row["attack"]["circle"]["asr"] and "base_rate" in summary["base"]["attack"]["circle"]
    alone = runner.invoke(app, ["attack", str(out / "ear"), "-c", "circle", "--judge", str(judge_dir), "--n-prompts", "2", "--tokens", "2",
                                "--iterations", "3", "--out", str(tmp_path / "alone")])
    assert alone.exit_code == 0, alone.output  # `erasekit attack` with the same settings finds the same words
    again = json.loads((tmp_path / "alone" / "attack.json").read_text())
    assert [p["adversarial_prompt"] for p in again["prompts"]] == [p["adversarial_prompt"] for p in record["prompts"]]
