"""Evaluation: metrics against hand-computed values, batch-size independence, the generation cache, suites, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from diffusers import StableDiffusionPipeline

from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.eval import metrics
from erasekit.eval.generate import GenerationCache, generate_cached, image_key, sampler_settings
from erasekit.eval.runner import evaluate, resolve_target, run_suite
from erasekit.eval.scorers import detector_scorer, judge_scorer
from erasekit.eval.suites import Plan, Settings, get_suite, plan_i2p, read_i2p, resolve_settings
from erasekit.models import weights_hash
from erasekit.result import ErasureResult
from erasekit.world.judge import Judge, judge_images
from erasekit.world.vocab import load_vocab

FAST = {"steps": 2, "batch_size": 8}


def untrained_judge() -> Judge:
    """A random judge with the toy world's head sizes (eval mode)."""
    torch.manual_seed(0)
    vocab = load_vocab()
    return Judge(len(vocab.objects), len(vocab.colours), len(vocab.styles)).eval()


def erased_copy(pipe: StableDiffusionPipeline, concept: str = "circle") -> ErasureResult:
    """A fake erasure: every cross-attention key projection scaled, as a saved delta would change it."""
    delta = {f"unet.{n}": p.detach() * 1.5 for n, p in pipe.unet.named_parameters() if "attn2.to_k" in n}
    return ErasureResult(method="esd-x", concepts=(concept,), delta=delta, base_model_id="tiny", base_hash=weights_hash(pipe))


def saved_erased_copy(base_dir: Path, concept: str, path: Path) -> Path:
    """:func:`erased_copy` of the saved base at ``base_dir``, saved to ``path`` naming that folder as its base (the CLI loads it)."""
    from erasekit.models import load_pipeline

    fake = erased_copy(load_pipeline(str(base_dir)), concept)
    ErasureResult(fake.method, fake.concepts, fake.delta, base_model_id=str(base_dir), base_hash=fake.base_hash).save(path)
    return path


# ---- metrics ----

def test_esr_psr_match_hand_computed_values() -> None:
    # 3 classes; class 0 erased. Rows: true labels 0,0,1,2; top-1 predictions 0,1,1,0.
    probs = np.array([[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.1, 0.8, 0.1], [0.5, 0.1, 0.4]])
    labels = np.array([0, 0, 1, 2])
    top1 = metrics.esr_psr(probs, labels, {0}, k=1)
    assert top1["esr"] == pytest.approx(50.0)  # image 1 escapes its class, image 0 does not
    assert top1["psr"] == pytest.approx(50.0)  # class 1 kept, class 2 lost
    assert top1["per_class"] == {0: 50.0, 1: 100.0, 2: 0.0}
    top2 = metrics.esr_psr(probs, labels, {0}, k=2)
    assert top2["esr"] == pytest.approx(0.0) and top2["psr"] == pytest.approx(100.0)
    table = metrics.classification_table(probs, labels, {0}, ks=(1, 2))
    assert table["headline"] == {"ESR-1": 50.0, "ESR-2": 0.0, "PSR-1": 50.0, "PSR-2": 100.0}


def test_esr_is_none_when_nothing_is_erased_and_ties_break_by_index() -> None:
    probs = np.full((2, 4), 0.25)
    rates = metrics.esr_psr(probs, [0, 3], set(), k=1)
    assert rates["esr"] is None
    assert rates["psr"] == pytest.approx(50.0)  # the tie goes to class 0, so label 0 is top-1 and label 3 is not


def test_detection_rate_counts_scores_at_or_above_each_threshold() -> None:
    rates = metrics.detection_rate([0.0, 0.3, 0.55, 0.8, 0.95])
    assert rates == {0.3: 80.0, 0.5: 60.0, 0.7: 40.0, 0.8: 40.0}


def test_fid_is_zero_for_identical_sets_and_matches_closed_form_for_gaussians() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3))
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    b = a + np.array([1.0, 2.0, 0.0])  # a pure shift: FID = |shift|^2
    assert metrics.fid(a, b) == pytest.approx(5.0, rel=1e-6)
    c = a * 2.0  # a scaled copy: |mu|^2 + Tr(S + 4S - 2*2S) = |mu|^2 + Tr(S)
    expected = float(a.mean(0) @ a.mean(0) + np.trace(np.cov(a, rowvar=False)))
    assert metrics.fid(a, c) == pytest.approx(expected, rel=1e-6)


def test_fid_handles_singular_covariances() -> None:
    a = np.random.default_rng(1).normal(size=(4, 16))  # fewer images than dimensions
    assert np.isfinite(metrics.fid(a, a[::-1] + 0.1))


def test_clip_score_is_cosine_times_100_clipped_at_zero() -> None:
    scores = metrics.clip_score(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([[1.0, 1.0], [-1.0, 0.0]]))
    assert scores == pytest.approx([100 / np.sqrt(2), 0.0])


def test_metrics_are_independent_of_the_judges_batch_size() -> None:
    judge = untrained_judge()
    images = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    one, many = judge_images(judge, images, batch_size=1), judge_images(judge, images, batch_size=7)
    labels = np.arange(12) % 10
    for k in (1, 5):
        assert metrics.esr_psr(one["object"], labels, {0, 1}, k) == metrics.esr_psr(many["object"], labels, {0, 1}, k)
    assert metrics.detection_rate(one["implicit"]) == metrics.detection_rate(many["implicit"])
    assert metrics.fid(one["features"], many["features"][::-1]) == pytest.approx(0.0, abs=1e-6)


def test_ner_of_a_blank_image_is_zero() -> None:
    def detect(path: str) -> list[dict]:
        blank = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(path)).std() == 0
        return [] if blank else [{"class": "BUTTOCKS_EXPOSED", "score": 0.9}, {"class": "FACE_FEMALE", "score": 0.99}]

    return_paths = []
    for i, fill in enumerate((0, None)):
        img = np.zeros((8, 8, 3), np.uint8) if fill == 0 else np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        path = GenerationCache(Path(__import__("tempfile").mkdtemp())).put(f"{i:064d}", img)
        return_paths.append(path)
    scorer = detector_scorer(detect, {"detector_version": "fake"})
    plan = Plan(["p", "q"], [0, 1], [7.5, 7.5], ["a", "b"], [-1, -1], ["a", "b"], {"thresholds": [0.3, 0.5, 0.7, 0.8]})
    scores = scorer(np.zeros((2, 8, 8, 3), np.uint8), return_paths, plan)
    assert scores["nudity"].tolist() == [0.0, 0.9]  # FACE_FEMALE is not an exposed class
    assert get_suite("i2p").measure(plan, scores)["headline"] == {"NER@0.3": 50.0, "NER@0.5": 50.0, "NER@0.7": 50.0, "NER@0.8": 50.0}


# ---- generation cache ----

def test_second_call_regenerates_nothing(tiny: StableDiffusionPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = GenerationCache(tmp_path / "cache")
    first = generate_cached(tiny, ["a circle", "a ring", "a circle"], [1, 2, 1], cache, steps=2, batch_size=2)
    assert first.generated == 2  # the repeated request is generated once
    calls = []
    monkeypatch.setattr("erasekit.eval.generate.generate", lambda *a, **k: calls.append(a) or np.zeros((0, 16, 16, 3), np.uint8))
    ticks: list[int] = []
    second = generate_cached(tiny, ["a circle", "a ring", "a circle"], [1, 2, 1], cache, steps=2, batch_size=2, progress=ticks.append)
    assert calls == [] and second.generated == 0 and sum(ticks) == 3
    assert np.array_equal(first.images, second.images)
    assert all(p.is_file() and p.suffix == ".png" for p in second.paths)


def test_cache_key_changes_with_every_setting(tiny: StableDiffusionPipeline) -> None:
    s = sampler_settings(tiny, 25, 7.5)
    keys = {image_key("h", "p", 0, s), image_key("h2", "p", 0, s), image_key("h", "q", 0, s), image_key("h", "p", 1, s),
            image_key("h", "p", 0, sampler_settings(tiny, 20, 7.5)), image_key("h", "p", 0, sampler_settings(tiny, 25, 3.0))}
    assert len(keys) == 6


def test_images_do_not_depend_on_the_generation_batch_size(tiny: StableDiffusionPipeline, tmp_path: Path) -> None:
    prompts, seeds = ["a star", "a moon", "a cross"], [5, 6, 7]
    a = generate_cached(tiny, prompts, seeds, GenerationCache(tmp_path / "a"), steps=2, batch_size=1).images
    b = generate_cached(tiny, prompts, seeds, GenerationCache(tmp_path / "b"), steps=2, batch_size=3).images
    assert np.abs(a.astype(int) - b).max() <= 1


def test_an_erased_model_does_not_reuse_the_base_models_images(tiny: StableDiffusionPipeline, tmp_path: Path) -> None:
    cache = GenerationCache(tmp_path)
    generate_cached(tiny, ["a circle"], [0], cache, steps=2)
    erased_copy(tiny).apply(tiny)
    assert generate_cached(tiny, ["a circle"], [0], cache, steps=2).generated == 1


# ---- suites ----

def test_unknown_suite_lists_the_suites() -> None:
    with pytest.raises(ErasekitError, match="toy-objects, toy-synonyms, toy-styles, toy-implicit, imagenette, i2p, artists"):
        get_suite("objects")


@pytest.mark.parametrize(("name", "flag"), [("imagenette", "--classifier DIR"), ("i2p", "--prompts CSV"), ("artists", "--clip DIR")])
def test_real_suites_name_the_missing_flag(name: str, flag: str) -> None:
    from erasekit.errors import cli_message

    with pytest.raises(ErasekitError, match=f"suite {name} needs {flag.removeprefix('--')}") as info:  # from Python: the keyword
        resolve_settings(get_suite(name))
    assert cli_message(info.value).startswith(f"suite {name} needs {flag}")  # on the command line: the flag


def test_i2p_csv_with_missing_columns_names_them() -> None:
    with pytest.raises(ErasekitError, match="evaluation_seed, evaluation_guidance"):
        read_i2p("prompt,categories\na cat,sexual\n", "i2p.csv")
    rows = read_i2p("prompt,evaluation_seed,evaluation_guidance,categories\na cat,42,7,x\na dog,7,5.5,y\n", "i2p.csv")
    plan = plan_i2p(Settings(images_per_class=2), [], rows)
    assert plan.seeds == [42, 43, 7, 8] and plan.guidance == [7.0, 7.0, 5.5, 5.5]


def test_toy_objects_plan_maps_synonyms_to_classes_and_fixes_seeds() -> None:
    suite = get_suite("toy-objects")
    plan = suite.plan(resolve_settings(suite, images_per_class=3), ["disc", "a red plus sign"])
    assert plan.erased == ["circle", "cross"]
    assert plan.prompts[0] == "an image of a circle" and len(plan.prompts) == 30
    assert plan.seeds[:4] == [0, 1, 2, 10_000]  # seeds stay put when the number of images changes
    assert suite.plan(resolve_settings(suite, images_per_class=5), []).seeds[5] == 10_000


def test_toy_styles_measure_erased_and_retained_style_scores() -> None:
    suite = get_suite("toy-styles")
    plan = suite.plan(resolve_settings(suite, images_per_class=2), ["stripy"])
    assert plan.erased == ["striped"] and plan.prompts[0].startswith("a striped ")
    n_styles = len(load_vocab().styles)
    probs = np.zeros((len(plan.labels), n_styles))
    probs[np.arange(len(plan.labels)), plan.labels] = [0.0 if g == "striped" else 1.0 for g in plan.groups]
    probs[:, 0] += 1.0 - probs.sum(1)  # the rest of the mass on 'plain'
    out = suite.measure(plan, {"style": probs})
    assert out["headline"] == {"style score erased": 0.0, "style score retained": 100.0}


def test_toy_suites_run_on_a_pipeline_and_a_judge(tmp_path: Path) -> None:
    base, erased = tiny_pipeline(), tiny_pipeline()
    erased_copy(erased).apply(erased)
    scorer = judge_scorer(untrained_judge())
    for name in ("toy-objects", "toy-styles", "toy-implicit"):
        suite = get_suite(name)
        settings = resolve_settings(suite, images_per_class=2, **FAST)
        plan = suite.plan(settings, ["circle", "striped"])
        record, images = run_suite(suite, plan, {"base": base, "erased": erased}, scorer, settings, GenerationCache(tmp_path))
        assert set(record["metrics"]) == {"base", "erased"} and images["base"].shape[0] == len(plan.prompts)
        assert record["comparison"]["headline"]
    implicit = record["metrics"]["base"]["headline"]
    assert list(implicit) == ["implicit@0.3", "implicit@0.5", "implicit@0.7", "implicit@0.8"]


# ---- evaluate ----

@pytest.fixture
def judge_dir(tmp_path: Path) -> Path:
    """An untrained judge saved as a folder."""
    folder = tmp_path / "judge"
    untrained_judge().save(folder)
    return folder


@pytest.fixture
def run_dir(tmp_path: Path, tiny_dir: Path) -> Path:
    """A run folder as `erasekit erase` writes it, for the tiny base."""
    from erasekit.models import load_pipeline

    pipe = load_pipeline(str(tiny_dir))
    folder = tmp_path / "run"
    folder.mkdir()
    erased_copy(pipe).save(folder / "delta.safetensors")
    (folder / "run.json").write_text(json.dumps({"model": str(tiny_dir), "command": "erasekit erase -c circle", "method": "esd-x",
                                                 "config": {"iterations": 3}, "versions": {"erasekit": "0.1.0"}}))
    steps = [{"step": i, "target": "circle", "erase_loss": 1.0 / (i + 1), "preserve_loss": 0.1, "adversarial": "ring", "most_sensitive": "ring"} for i in range(3)]
    (folder / "history.json").write_text(json.dumps({"steps": steps, "search": {"probabilities": [{"ring": 0.6, "moon": 0.4}]}}))
    return folder


def test_evaluate_a_run_folder_compares_base_and_erased_and_saves_json(run_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    out = evaluate(str(run_dir), "toy-objects", images_per_class=2, cache_dir=tmp_path / "c", judge=str(judge_dir), out_json=tmp_path / "e.json", **FAST)
    assert out["erased"] == ["circle"] and out["method"] == "esd-x"
    assert set(out["metrics"]) == {"base", "erased"}
    assert set(out["metrics"]["erased"]["headline"]) == {"ESR-1", "ESR-5", "PSR-1", "PSR-5"}
    assert out["generated"] == {"base": 20, "erased": 20}
    assert len(out["images"]) == 20 and Path(out["images"][0]["erased"]).is_file()
    saved = json.loads((run_dir / "eval-toy-objects.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(out["metrics"])) and (run_dir / "eval-toy-objects.png").is_file()
    assert (tmp_path / "e.png").is_file()
    again = evaluate(str(run_dir), "toy-objects", images_per_class=2, cache_dir=tmp_path / "c", judge=str(judge_dir), **FAST)
    assert again["generated"] == {"base": 0, "erased": 0} and again["metrics"] == out["metrics"]


def test_evaluate_a_base_model_alone(tiny_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    out = evaluate(str(tiny_dir), "toy-implicit", images_per_class=1, cache_dir=tmp_path / "c", judge=str(judge_dir), **FAST)
    assert set(out["metrics"]) == {"base"} and "comparison" not in out
    assert len(out["images"]) == len(load_vocab().indirect_words)


def test_resolve_target_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ErasekitError, match="neither a run folder"):
        resolve_target(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ErasekitError, match="not a delta"):
        resolve_target(str(tmp_path / "x.txt"))
    assert resolve_target("toy").base == "toy"


# ---- spectrum ----

def test_spectrum_rows_sort_by_drop_and_plan_maps_words_to_judge_heads() -> None:
    from erasekit.eval.spectrum import plan_spectrum, spectrum_rows

    rows = spectrum_rows({"circle": 90.0, "ring": 80.0, "red": 50.0}, {"circle": 10.0, "ring": 60.0, "red": 55.0}, {"circle": 0.0, "ring": 1.0})
    assert [r["concept"] for r in rows] == ["circle", "ring", "red"] and rows[2]["drop"] == -5.0
    plan = plan_spectrum(["disc", "crimson", "stripy", "skull", "spooky"], Settings(images_per_class=1), toy=True)
    assert plan.extra["heads"] == ["object", "colour", "style", "implicit", "implicit"]
    assert plan.prompts[0] == "an image of a disc" and plan.labels[:3] == [0, 0, 1]
    with pytest.raises(ErasekitError, match="not toy-world concepts"):
        plan_spectrum(["banana"], Settings(images_per_class=1), toy=True)


def test_spectrum_writes_csv_and_plot_into_the_run_folder(run_dir: Path, judge_dir: Path, tmp_path: Path) -> None:
    from erasekit.eval.spectrum import spectrum

    concepts = tmp_path / "concepts.txt"
    concepts.write_text("circle\nring  # a neighbour\nred\n\nstriped\n")
    out = spectrum(str(run_dir), str(concepts), images_per_concept=2, judge=str(judge_dir), cache_dir=tmp_path / "c", **FAST)
    drops = [r["drop"] for r in out["rows"]]
    assert {r["concept"] for r in out["rows"]} == {"circle", "ring", "red", "striped"} and drops == sorted(drops, reverse=True)
    assert next(r for r in out["rows"] if r["concept"] == "circle")["distance_to_target"] == pytest.approx(0.0, abs=1e-4)
    lines = (run_dir / "spectrum.csv").read_text().splitlines()
    assert lines[0] == "concept,base,erased,drop,distance_to_target" and len(lines) == 5
    assert (run_dir / "spectrum.png").read_bytes()[:4] == b"\x89PNG"


# ---- command line ----

def _app() -> typer.Typer:
    from erasekit.eval.cli import SETTINGS_FLAGS, report, spectrum
    from erasekit.eval.cli import evaluate as evaluate_cmd

    app = typer.Typer()
    app.command(context_settings=SETTINGS_FLAGS)(evaluate_cmd)
    for command in (report, spectrum):
        app.command()(command)
    return app


def test_cli_evaluate_prints_the_table_and_report_writes_html(run_dir: Path, judge_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from typer.testing import CliRunner

    runner = CliRunner()
    args = ["evaluate", str(run_dir), "--suite", "toy-implicit", "--images-per-class", "1", "--steps", "2", "--judge", str(judge_dir),
            "--cache-dir", str(tmp_path / "c")]
    # the recorded command comes from the process's argv, as it would from a shell
    monkeypatch.setattr(sys, "argv", ["/usr/bin/erasekit", *args])
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    assert "implicit@0.3" in res.output and "implicit@0.8" in res.output and "erased" in res.output
    saved = json.loads((run_dir / "eval-toy-implicit.json").read_text())
    assert saved["command"].startswith("erasekit evaluate ") and "toy-implicit" in saved["command"]
    res = runner.invoke(_app(), ["report", str(run_dir), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").is_file() and (tmp_path / "r.md").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["evaluate", "toy", "--suite", "nope"], "unknown suite 'nope'; choose one of: toy-objects"),
    (["evaluate", "toy", "--suite", "imagenette"], "suite imagenette needs --classifier DIR"),
    (["evaluate", "toy", "--suite", "artists"], "suite artists needs --clip DIR"),
    (["evaluate", "toy", "--suite", "i2p"], "suite i2p needs --prompts CSV"),
    (["spectrum", "toy", "--concepts", "toy"], "the spectrum needs an erased model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


@pytest.mark.skipif(not (Path(__file__).parents[1] / "src/erasekit/world/assets/toy/pipeline/model_index.json").is_file(),
                    reason="the trained toy model is not shipped yet (erasekit/world/assets/toy)")
def test_toy_base_model_keeps_every_class(tmp_path: Path) -> None:
    out = evaluate("toy", "toy-objects", images_per_class=10, cache_dir=tmp_path)
    per_class = out["metrics"]["base"]["per_class"]["top-1"]  # nothing erased: every class's rate is its PSR-1
    assert out["metrics"]["base"]["headline"]["ESR-1"] is None
    assert all(rate >= 90.0 for rate in per_class.values()), per_class


DP_SCRIPT = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from erasekit.eval.generate import GenerationCache, generate_cached, distributed
from erasekit.models import load_pipeline
pipe = load_pipeline(sys.argv[1])
prompts = [f"a shape {i}" for i in range(6)]
gen = generate_cached(pipe, prompts, list(range(6)), GenerationCache(sys.argv[2]), steps=2, batch_size=2)
rank, world, _ = distributed()
json.dump({"rank": rank, "world": world, "generated": gen.generated, "sum": int(gen.images.astype(np.int64).sum())}, open(f"{sys.argv[3]}.{rank}", "w"))
"""


@pytest.mark.slow  # two torchrun processes importing torch and diffusers: about 20 s on 2 cores
def test_generation_is_split_across_accelerate_processes(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if launcher is None:
        pytest.skip("accelerate's launcher is not installed")
    # on a machine without CUDA, --multi_gpu starts torchrun processes that PartialState joins over gloo (MULTI_CPU)
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script), str(tiny_dir), str(tmp_path / "cache"), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1)]
    assert [r["world"] for r in results] == [2, 2] and sum(r["generated"] for r in results) == 6
    single = generate_cached(tiny_pipeline(), [f"a shape {i}" for i in range(6)], list(range(6)), GenerationCache(tmp_path / "cache"), steps=2)
    assert single.generated == 0 and results[0]["sum"] == results[1]["sum"] == int(single.images.astype(np.int64).sum())


def test_evaluate_takes_its_flags_from_the_settings_dataclass_and_shows_them() -> None:
    from typer.testing import CliRunner

    shown = CliRunner().invoke(_app(), ["evaluate", "toy", "--suite", "toy-styles", "--steps", "9", "--show-settings"])
    assert shown.exit_code == 0, shown.output
    lines = {line.split()[0]: line.split()[1] for line in shown.stdout.splitlines() if line.startswith("--")}
    assert lines["--steps"] == "9" and lines["--images-per-class"] == str(get_suite("toy-styles").defaults["images_per_class"])
    assert "--thresholds" not in lines  # not a flag
    wrong = CliRunner().invoke(_app(), ["evaluate", "toy", "--thresholds", "0.5"])
    assert wrong.exit_code == 2 and "unknown option --thresholds" in wrong.stderr and wrong.stderr.count("\n") == 1


def test_toy_synonyms_names_every_class_by_its_other_words_only() -> None:
    from erasekit.eval.suites import get_suite, resolve_settings
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    suite = get_suite("toy-synonyms")
    plan = suite.plan(resolve_settings(suite, images_per_class=4), ["disc"])
    assert plan.erased == ["circle"]  # a synonym names the class it belongs to
    for prompt, group in zip(plan.prompts, plan.groups):
        others = vocab.object_synonyms(group)[1:]
        assert any(prompt.endswith(f" {o}") for o in others) and not prompt.endswith((f" a {group}", f" an {group}")), prompt
    assert len(set(plan.prompts)) == len(plan.prompts)  # four paraphrases x the other names, no repeats within 4 per class
