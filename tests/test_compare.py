"""`erasekit compare`: several methods on the same tiny model and seeds, one table, base images generated once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from erasekit.compare import compare, compare_methods, default_suites
from erasekit.methods import base as method_base
from erasekit.models import load_pipeline
from erasekit.result import load_result

runner = CliRunner()
TINY_TRAIN = ["iterations=2", "ddim_steps=2", "lr=1e-3"]
EVAL = {"images_per_class": 1, "steps": 2}


def cli() -> typer.Typer:
    """An app with `compare` registered the way cli.py registers it."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(compare)

    @app.callback()
    def main() -> None:
        """erasekit (test harness)."""

    return app


def _table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def test_compare_runs_every_method_on_the_same_seeds_and_generates_base_images_once(tiny_dir: Path, judge_dir: Path, words_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    settings = [f"--set=esd-x.{s}" for s in TINY_TRAIN] + [f"--set=eap.{s}" for s in TINY_TRAIN]
    settings += [f"--set=eap.concept_space={words_file}", "--set=eap.k=8", "--set=eap.n_centres=3"]
    res = runner.invoke(cli(), ["compare", "--model", str(tiny_dir), "-c", "circle", "--methods", "esd-x,uce", "--methods", "eap", "--out", str(out),
                                "--judge", str(judge_dir), "--images-per-class", "1", "--steps", "2", "--seed", "3", *settings])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.stdout)
    assert [r[0] for r in rows] == ["base (no erasure)", "esd-x", "uce", "eap"]
    header = [c.strip() for c in res.stdout.splitlines()[2].strip("|").split("|")]
    assert header == ["method", "ESR-1", "ESR-5", "PSR-1", "PSR-5", "wall s", "peak MiB"]
    assert (out / "compare.md").read_text() == res.stdout.rstrip("\n") + "\n"
    summary = json.loads((out / "compare.json").read_text())
    assert summary["suites"] == ["toy-objects"] and summary["seed"] == 3
    assert summary["base"]["generated"] == {"toy-objects": 10}  # 10 classes x 1 image, generated before any method ran
    for row in summary["rows"]:
        assert "error" not in row
        assert row["generated"]["toy-objects"] == {"base": 0, "erased": 10}, "the base images come from the shared cache"
        assert row["wall_s"] > 0 and row["peak_rss_mib"] >= row["loaded_rss_mib"] > 0
        assert set(row["metrics"]["toy-objects"]) == {"ESR-1", "ESR-5", "PSR-1", "PSR-5"}
        result = load_result(out / row["method"] / "delta.safetensors")
        assert result.method == row["method"] and result.concepts == ("circle",)
        result.apply(load_pipeline(str(tiny_dir)))  # a loadable delta made for this base
        run = json.loads((out / row["method"] / "run.json").read_text())
        assert run["command"].startswith("erasekit erase --model") and (out / row["method"] / "eval-toy-objects.json").is_file()
    configs = {r["method"]: json.loads((out / r["method"] / "run.json").read_text())["config"] for r in summary["rows"]}
    assert configs["esd-x"]["seed"] == configs["eap"]["seed"] == 3 and configs["eap"]["iterations"] == 2
    assert (out / "report.html").is_file() and "esd-x" in (out / "report.html").read_text()


@dataclass
class BrokenConfig:
    """A method that always fails."""

    seed: int = 0


def _broken(pipe, request, config, progress):  # noqa: ANN001, ANN202
    raise RuntimeError("out of memory")


def test_a_failing_method_is_recorded_and_the_others_kept(tiny_dir: Path, judge_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(method_base._REGISTRY, "broken", method_base.MethodSpec("broken", "fails", BrokenConfig, _broken, {}))
    summary = compare_methods(str(tiny_dir), "circle", tmp_path / "cmp", methods=["broken", "uce"], judge=str(judge_dir), isolate=False, **EVAL)
    broken, uce = summary["rows"]
    assert broken["error"] == "RuntimeError: out of memory" and not broken["metrics"]
    assert "error" not in uce and uce["metrics"]["toy-objects"]["ESR-1"] is not None
    rows = _table_rows((tmp_path / "cmp" / "compare.md").read_text())
    assert rows[1][0] == "broken" and rows[1][-1] == "failed: RuntimeError: out of memory" and rows[2][-1] == ""
    assert summary["report"] == "report.html"


def test_default_suites_follow_the_concept() -> None:
    assert default_suites(["circle"]) == ["toy-objects"]
    assert default_suites(["dotted"]) == ["toy-styles"]
    assert default_suites(["skull"]) == ["toy-implicit", "toy-objects"]


@pytest.mark.parametrize("args, message", [
    (["-c", " "], "empty concept"),
    (["-c", "circle", "--methods", "esd-x,nope"], "unknown method 'nope'; choose one of:"),
    (["-c", "circle", "--methods", ","], "--methods is empty"),
    (["-c", "circle", "--set", "eap.iterations"], "METHOD.KEY=VALUE"),
    (["-c", "circle", "--methods", "uce", "--set", "eap.k=3"], "not being compared"),
    (["-c", "circle", "--methods", "esd-x", "--set", "esd-x.nope=1"], "unknown option --nope"),
    (["-c", "circle", "--methods", "esd-x", "--set", "esd-x.iterations=0"], "iterations must be >= 1"),
    (["-c", "a teapot", "--methods", "uce"], "no evaluation suite fits"),
    (["-c", "a teapot", "--methods", "uce", "--suite", "toy-objects", "--attack"], "--attack judges images with the toy world's judge: unknown concept"),
    (["-c", "circle", "--methods", "uce", "--attack", "--attack-set", "nope=1"], "--attack-set 'nope=1': unknown option --nope; the settings here are: --n-prompts"),
    (["-c", "circle", "--methods", "uce", "--attack", "--attack-set", "iterations"], "--attack-set expects KEY=VALUE"),
    (["-c", "circle", "--methods", "uce", "--attack", "--attack-set", "tokens=0"], "--attack-set tokens must be at least 1"),
    (["-c", "circle", "--methods", "uce", "--attack-set", "tokens=2"], "--attack-set needs --attack"),
])
def test_bad_input_is_one_line_and_exit_code_2(args: list[str], message: str, tiny_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    res = runner.invoke(cli(), ["compare", "--model", str(tiny_dir), "--judge", str(judge_dir), "--out", str(out), *args])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and message in errors[0], res.output
    assert not out.exists()


def test_an_existing_out_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    res = runner.invoke(cli(), ["compare", "--model", str(tiny_dir), "-c", "circle", "--out", str(tmp_path / "taken")])
    assert res.exit_code == 2 and "already exists" in res.output


ATTACK = ["--attack", "--attack-set", "n_prompts=2", "--attack-set", "iterations=3", "--attack-set", "tokens=2", "--attack-set", "noise-draws=1"]


def test_compare_attack_adds_the_success_rate_of_the_same_attack_on_every_method(tiny_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    from erasekit.attack import attack

    out = tmp_path / "cmp"
    settings = [f"--set=esd-x.{s}" for s in TINY_TRAIN] + ["--set=esd-x.train_method=lora"]
    res = runner.invoke(cli(), ["compare", "--model", str(tiny_dir), "-c", "circle", "--methods", "uce,esd-x", "--out", str(out), "--judge", str(judge_dir),
                                "--images-per-class", "1", "--steps", "2", "--in-process", *settings, *ATTACK])
    assert res.exit_code == 0, res.output
    header = [c.strip() for c in res.stdout.splitlines()[2].strip("|").split("|")]
    assert header == ["method", "ESR-1", "ESR-5", "PSR-1", "PSR-5", "ASR %", "no attack %", "wall s", "peak MiB"]
    summary = json.loads((out / "compare.json").read_text())
    assert summary["attack"]["n_prompts"] == 2 and summary["attack"]["steps"] == 2 and summary["attack"]["seed"] == 0
    base_rate = summary["base"]["attack"]["circle"]["base_rate"]
    rows = {r[0]: r for r in _table_rows(res.stdout)}
    assert rows["base (no erasure)"][5:7] == ["–", f"{base_rate:.1f}"]
    for row in summary["rows"]:
        assert "attack_error" not in row, row.get("attack_error")
        saved = json.loads((out / row["method"] / "attack-circle" / "attack.json").read_text())
        assert saved["method"] == row["method"] and saved["settings"]["iterations"] == 3
        found = row["attack"]["circle"]
        assert {k: found[k] for k in saved["metrics"]} == saved["metrics"]
        assert found["base_rate"] == base_rate, "every method is attacked on the same base images"
        assert found["asr"] >= found["no_attack_rate"]
        assert rows[row["method"]][5:7] == [f"{found['asr']:.1f}", f"{found['no_attack_rate']:.1f}"]
    # the standalone command on the same run, settings and seed finds the same prompts: sharing the base images changes nothing
    alone = attack(str(out / "esd-x"), "circle", judge=str(judge_dir), out=tmp_path / "alone", n_prompts=2, iterations=3, tokens=2, noise_draws=1, steps=2)
    shared = json.loads((out / "esd-x" / "attack-circle" / "attack.json").read_text())
    assert [p["token_ids"] for p in alone["prompts"]] == [p["token_ids"] for p in shared["prompts"]]
    assert alone["metrics"] == shared["metrics"]
    assert load_result(out / "esd-x" / "delta.safetensors").kind == "lora"


def test_a_failing_attack_keeps_the_methods_other_results(tiny_dir: Path, judge_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("search diverged")

    monkeypatch.setattr("erasekit.attack.run.attack_pipeline", broken)
    summary = compare_methods(str(tiny_dir), "circle", tmp_path / "cmp", methods=["uce"], judge=str(judge_dir), isolate=False,
                              attack={"n_prompts": 1, "iterations": 1, "noise_draws": 1}, **EVAL)
    (uce,) = summary["rows"]
    assert uce["attack_error"] == "RuntimeError: search diverged" and uce["metrics"]["toy-objects"]["ESR-1"] is not None
    rows = _table_rows((tmp_path / "cmp" / "compare.md").read_text())
    assert rows[1][0] == "uce" and rows[1][-1] == "attack failed: RuntimeError: search diverged" and rows[1][5] == "–"


def test_compare_over_seeds_pairs_methods_and_prints_intervals(tiny_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp-seeds"
    settings = [f"--set=esd-x.{s}" for s in TINY_TRAIN]
    res = runner.invoke(cli(), ["compare", "--model", str(tiny_dir), "-c", "circle", "--methods", "esd-x,uce", "--out", str(out), "--judge", str(judge_dir),
                                "--images-per-class", "1", "--steps", "2", "--seed", "5", "--seeds", "2", "--in-process", *settings])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "compare.json").read_text())
    assert summary["seeds"] == [5, 6] and summary["intervals"] is True
    esd = next(r for r in summary["rows"] if r["method"] == "esd-x")
    assert [r["seed"] for r in esd["per_seed"]] == [5, 6]
    configs = [json.loads((out / f"esd-x-seed{s}" / "run.json").read_text())["config"]["seed"] for s in (5, 6)]
    assert configs == [5, 6]  # each run trained with its own seed
    for key, span in esd["intervals"]["toy-objects"].items():
        per_seed = [r["metrics"]["toy-objects"][key] for r in esd["per_seed"]]
        assert sum(per_seed) / 2 == pytest.approx(span["mean"], abs=1e-3)
        assert span["lo"] <= span["mean"] <= span["hi"]
        assert span["images"] == (1 if key.startswith("ESR") else 9)  # one circle image and nine others per seed
    first = _table_rows(res.stdout)[1]
    assert first[0] == "esd-x" and "[" in first[1] and "]" in first[1]
    assert "training seeds 5-6 (paired)" in res.stdout
    report = (out / "report.html").read_text()
    assert "comparison over training seeds" in report and "rates with 95 % intervals" in report
    assert "esd-x-seed6" in report  # every seed's run is in the report


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "seeds must be a whole number >= 1"),
    (["--intervals"], "an interval over training seeds needs at least 2 seeds"),
    (["--seeds", "2", "--set", "esd-x.seed=3"], "--set esd-x.seed fixes the training seed"),
])
def test_compare_refuses_bad_seed_settings_in_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    res = runner.invoke(cli(), ["compare", "-c", "circle", "--methods", "esd-x", "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "x").exists()


def test_a_stopped_comparison_resumes_keeping_the_finished_runs(tiny_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_dir), "-c", "circle", "--methods", "esd-x,uce", "--out", str(out), "--judge", str(judge_dir),
            "--images-per-class", "1", "--steps", "2", "--in-process", *[f"--set=esd-x.{s}" for s in TINY_TRAIN]]
    first = runner.invoke(cli(), args)
    assert first.exit_code == 0, first.output
    kept = (out / "esd-x" / "delta.safetensors").stat().st_mtime_ns
    (out / "uce" / "compare-record.json").unlink()  # uce was cut short: erased, but its record never written
    resumed = runner.invoke(cli(), [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (out / "esd-x" / "delta.safetensors").stat().st_mtime_ns == kept, "a finished run is kept, not redone"
    assert (out / "uce" / "compare-record.json").is_file()
    strip = lambda rows: [r[:5] for r in rows]  # noqa: E731  (metrics; wall time and memory differ between runs)
    assert strip(_table_rows(resumed.stdout)) == strip(_table_rows(first.stdout))
    other = runner.invoke(cli(), [*[a if a != "2" else "3" for a in args], "--resume"])
    assert other.exit_code == 2 and "other settings" in other.output
    nothing = runner.invoke(cli(), [*[str(tmp_path / "none") if a == str(out) else a for a in args], "--resume"])
    assert nothing.exit_code == 2 and "--resume needs a comparison" in nothing.output


def test_the_table_keeps_two_suites_that_report_the_same_metric_apart() -> None:
    from erasekit.compare_table import markdown

    def row(method: str, a: float, b: float) -> dict:
        return {"method": method, "metrics": {"toy-objects": {"ESR-1": a}, "toy-synonyms": {"ESR-1": b}}, "wall_s": 1.0, "peak_rss_mib": 1.0}

    summary = {"base": row("base", 6.0, 7.0), "rows": [row("eap", 90.0, 40.0)], "concepts": ["circle"], "model": "toy",
               "suites": ["toy-objects", "toy-synonyms"], "seed": 0}
    table = markdown(summary)
    assert "| method | toy-objects ESR-1 | toy-synonyms ESR-1 |" in table
    assert "| eap | 90.0 | 40.0 |" in table  # before: one ESR-1 column, the last suite's value
