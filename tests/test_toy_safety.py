"""toy-safety: the plan, each domain's number on scores whose answer is known, the privacy reference, and one CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.eval import toy_safety
from erasekit.eval.scorers import Scorer
from erasekit.eval.suites import Plan, get_suite, resolve_settings
from erasekit.eval.toy_safety import HEADLINE, SEP
from erasekit.world.judge import Judge, judge_images
from erasekit.world.train import render_dataset
from erasekit.world.vocab import load_vocab

SUITE = get_suite("toy-safety")


def plan(n: int = 3, seed: int = 0) -> Plan:
    """The suite's plan at n images per prompt."""
    return SUITE.plan(resolve_settings(SUITE, images_per_class=n, seed=seed), ["skull"])


def fake_scores(p: Plan, skull: dict[str, int] | None = None, colour: np.ndarray | None = None, style: np.ndarray | None = None,
                distance: np.ndarray | None = None, threshold: float = 1.0) -> dict[str, np.ndarray]:
    """Judge-shaped scores: the first skull[task] images of each toxicity task carry the skull; colour/style readings per fairness image."""
    vocab, n = load_vocab(), len(p.prompts)
    tasks = np.asarray([p.extra["taxonomy"][g]["task"] for g in p.groups])
    implicit = np.zeros(n)
    for task, k in (skull or {}).items():
        implicit[np.flatnonzero(tasks == task)[:k]] = 0.9
    fair = np.flatnonzero([p.extra["taxonomy"][g]["domain"] == "fairness" for g in p.groups])
    out = {"implicit": implicit}
    for head, readings, k in (("colour", colour, len(vocab.colours)), ("style", style, len(vocab.styles))):
        probs = np.full((n, k), 0.1 / k)
        probs[fair, readings if readings is not None else 0] += 0.9
        out[head] = probs
    out["train_distance"] = np.full(n, 5.0) if distance is None else distance
    out["near_duplicate_threshold"] = np.full(n, threshold)
    return out


def blank_plan(n: int) -> Plan:
    """A plan of n images whose prompts do not matter to the scorer."""
    return Plan([""] * n, [0] * n, [7.5] * n, ["g"] * n, [-1] * n, [])


def untrained_judge() -> Judge:
    """A random judge with the toy world's head sizes (eval mode)."""
    torch.manual_seed(0)
    vocab = load_vocab()
    return Judge(len(vocab.objects), len(vocab.colours), len(vocab.styles)).eval()


# ---- the plan ----

def test_plan_has_every_domain_task_and_category_and_stable_seeds() -> None:
    vocab, p = load_vocab(), plan(3)
    tax = p.extra["taxonomy"]
    by = {(t["domain"], t["task"]) for t in tax.values()}
    assert by == {("toxicity", "implicit"), ("toxicity", "named"), ("fairness", "unspecified colour and style"), ("privacy", "training scenes")}
    implicit = {t["category"] for t in tax.values() if t["task"] == "implicit"}
    named = {t["category"] for t in tax.values() if t["task"] == "named"}
    assert implicit == set(vocab.indirect_words) and named == set(vocab.raw["implicit"]["named_phrases"])
    for prompt, t in tax.items():
        words = set(prompt.split())
        if t["domain"] == "fairness":  # colour and style left to the model
            assert not words & {*vocab.colours, *vocab.styles, "skull"} and t["category"] in words
        if t["task"] == "named":
            assert "skull" in words
        if t["task"] == "implicit":
            assert "skull" not in words and t["category"] in words
    scenes = {t["category"] for t in tax.values() if t["domain"] == "privacy"}
    assert scenes == {", ".join(s) for s in toy_safety.privacy_scenes(vocab)} and len(scenes) == 6
    assert len(p.prompts) == 3 * len(tax) and p.erased == [] and len(set(p.prompts)) == len(tax)
    # image j of prompt g keeps its seed whatever N is, and the seed shifts them all
    small = plan(2)
    pairs3 = set(zip(p.prompts, p.seeds))
    assert set(zip(small.prompts, small.seeds)) <= pairs3 and len(set(p.seeds)) == len(p.seeds)
    assert plan(1, seed=7).seeds[:2] == [7, 10_007]


# ---- metrics on scores whose answers are known ----

def test_toxicity_rate_is_k_of_n_per_task_and_overall() -> None:
    p = plan(3)
    out = SUITE.measure(p, fake_scores(p, skull={"implicit": 18, "named": 72}))  # 24 prompts x 3 images per task
    assert out["headline"][HEADLINE["toxicity"]] == pytest.approx(100 * 90 / 144)
    task = out["per_task"]
    assert task[f"toxicity{SEP}implicit"]["rate"] == pytest.approx(25.0) and task[f"toxicity{SEP}named"]["rate"] == pytest.approx(100.0)
    assert task[f"toxicity{SEP}implicit"]["unsafe"] == 18 and task[f"toxicity{SEP}implicit"]["scored"] == 72
    spooky = out["per_category"][f"toxicity{SEP}implicit{SEP}spooky"]  # the first prompt: all 3 of its images
    assert spooky["rate"] == 100.0 and out["per_category"][f"toxicity{SEP}implicit{SEP}gothic"]["rate"] == 0.0
    tox = out["per_domain"]["toxicity"]
    assert tox["interval"]["lo"] < tox["rate"] < tox["interval"]["hi"] and tox["at"] == {"0.3": tox["rate"], "0.5": tox["rate"], "0.7": tox["rate"], "0.8": tox["rate"]}
    none = SUITE.measure(p, fake_scores(p))
    assert none["headline"][HEADLINE["toxicity"]] == 0.0 and none["per_domain"]["toxicity"]["interval"]["hi"] > 0  # Wilson: not a point


def test_bias_score_is_0_for_uniform_1_for_one_value_and_tv_between() -> None:
    assert toy_safety.bias_score(np.array([5, 5, 5, 5, 5, 5])) == pytest.approx(0.0)
    assert toy_safety.bias_score(np.array([0, 0, 30, 0, 0, 0])) == pytest.approx(1.0)
    assert toy_safety.bias_score(np.array([15, 15, 0, 0, 0, 0])) == pytest.approx(0.8)  # TV 2/3 over its maximum 5/6
    assert toy_safety.bias_score(np.array([[1, 1], [2, 0]])).tolist() == pytest.approx([0.0, 1.0])
    assert toy_safety.uniform_floor(1000, 6) < toy_safety.uniform_floor(60, 6) < 0.3  # a fair model's finite-sample score shrinks with images
    with pytest.raises(ErasekitError, match="no images"):
        toy_safety.bias_score(np.zeros(6))


def test_fairness_reads_the_distribution_and_its_bias() -> None:
    vocab, p = load_vocab(), plan(3)  # 50 fairness prompts x 3 = 150 images: 25 per colour
    out = SUITE.measure(p, fake_scores(p, colour=np.arange(150) % 6, style=np.zeros(150, int)))
    colour, style = out["per_task"][f"fairness{SEP}colour"], out["per_task"][f"fairness{SEP}style"]
    assert colour["bias"] == pytest.approx(0.0) and list(colour["distribution"].values()) == pytest.approx([100 / 6] * 6)
    assert style["bias"] == pytest.approx(100.0) and style["distribution"][vocab.styles[0]] == 100.0
    assert out["headline"][HEADLINE["fairness"]] == pytest.approx(50.0)
    assert out["per_category"][f"fairness{SEP}colour{SEP}red"]["images"] == 25 and colour["uniform_floor"] > 0
    assert colour["interval"]["lo"] == 0.0 < colour["interval"]["hi"]  # every resample of a uniform set is uneven: the interval holds 0 and more
    again = SUITE.measure(p, fake_scores(p, colour=np.arange(150) % 6, style=np.zeros(150, int)))
    assert again["per_task"][f"fairness{SEP}colour"]["interval"] == colour["interval"]  # fixed seed


def test_privacy_rate_counts_distances_at_or_below_the_threshold() -> None:
    p = plan(3)
    privacy = np.asarray([p.extra["taxonomy"][g]["domain"] == "privacy" for g in p.groups])
    distance = np.full(len(p.prompts), 5.0)
    distance[np.flatnonzero(privacy)[:18]] = 0.5  # 18 of the 72 privacy images are near their training render
    out = SUITE.measure(p, fake_scores(p, distance=distance, threshold=0.5))
    assert out["headline"][HEADLINE["privacy"]] == pytest.approx(25.0)
    assert out["per_domain"]["privacy"]["threshold"] == 0.5 and out["per_domain"]["privacy"]["unsafe"] == 18
    scores = fake_scores(p)
    del scores["train_distance"], scores["near_duplicate_threshold"]
    bare = SUITE.measure(p, scores)  # a scorer without the reference: privacy says why it is missing
    assert bare["headline"][HEADLINE["privacy"]] is None and "privacy_note" in bare


def test_compare_reports_paired_changes_with_intervals() -> None:
    p = plan(3)
    base = fake_scores(p, skull={"implicit": 72, "named": 72}, colour=np.zeros(150, int))
    erased = fake_scores(p, colour=np.arange(150) % 6)
    for s in (base, erased):
        s["features"] = np.random.default_rng(0).normal(size=(len(p.prompts), 8))
    out = SUITE.compare(p, base, erased)
    tox, fair = out["per_domain"]["toxicity"], out["per_domain"]["fairness"]
    assert out["headline"][f"Δ {HEADLINE['toxicity']}"] == pytest.approx(-100.0) and tox["hi"] < 0
    assert fair["difference"] == pytest.approx(-50.0) and fair["lo"] <= -50.0 <= fair["hi"] < 0
    assert out["per_domain"]["privacy"]["difference"] == 0.0 and out["per_domain"]["privacy"]["hi"] > 0  # Newcombe: not a point
    assert out["per_task"][f"toxicity{SEP}named"]["difference"] == pytest.approx(-100.0) and "FID vs base" in out["headline"]


# ---- privacy: nearest distances, the held-out threshold, the reference ----

def test_nearest_distance_is_zero_for_a_reference_row_and_the_threshold_flags_its_quantile() -> None:
    reference = np.random.default_rng(0).normal(size=(50, 4))
    far = reference + 100.0
    assert toy_safety.nearest_distances(reference[::-1], reference) == pytest.approx(np.zeros(50), abs=1e-6)
    assert (toy_safety.nearest_distances(far, reference) > 99).all()
    heldout = np.random.default_rng(1).uniform(1, 2, size=1000)
    threshold = toy_safety.heldout_threshold(heldout, 0.05)
    assert np.mean(heldout <= threshold) == pytest.approx(0.05, abs=0.002) and 1 < threshold < 2
    with pytest.raises(ErasekitError, match="quantile"):
        toy_safety.heldout_threshold(heldout, 1.5)


def test_scene_draws_match_render_dataset() -> None:
    vocab = load_vocab()
    data = render_dataset(240, 3)
    labels = [(vocab.objects[data["object"][i]], vocab.colours[data["colour"][i]], vocab.styles[data["style"][i]]) for i in range(240)]
    scenes = set(labels[:120])
    found = toy_safety.scene_indices(3, sorted(scenes), 0, 240)
    assert found == [i for i in range(240) if labels[i] in scenes] and set(range(120)) <= set(found) and len(found) < 240
    assert (toy_safety.renders(3, found[:3]) == data["images"][found[:3]]).all()


def test_training_renders_are_near_duplicates_and_heldout_ones_by_construction_only() -> None:
    vocab, judge, vae = load_vocab(), untrained_judge(), tiny_pipeline().vae
    scenes = toy_safety.privacy_scenes(vocab)[:2]
    reference = toy_safety.build_reference(judge, vae, seed=0, n_images=3000, scenes=scenes, heldout=40, quantile=0.05)
    train = toy_safety.scene_indices(0, scenes, 0, 3000)
    assert reference.info["training_renders"] == len(train) == len(reference.features) > 3 and reference.threshold > 0
    scorer = toy_safety.privacy_scorer(Scorer(lambda images, paths, p: {"implicit": np.zeros(len(images))}), judge, reference)
    copies = toy_safety.vae_round_trip(vae, toy_safety.renders(0, train))  # what a model that memorised them would draw
    heldout = toy_safety.scene_indices(0, scenes, toy_safety.HELDOUT_OFFSET, toy_safety.HELDOUT_OFFSET + 40_000, limit=40)
    fresh = toy_safety.vae_round_trip(vae, toy_safety.renders(0, heldout))
    assert (scorer(copies, [], blank_plan(len(copies)))["train_distance"] <= reference.threshold).all()
    fresh_scores = scorer(fresh, [], blank_plan(40))
    assert np.mean(fresh_scores["train_distance"] <= reference.threshold) == pytest.approx(0.05)  # 2 of 40, by construction
    assert np.allclose(fresh_scores["near_duplicate_threshold"], reference.threshold) and "privacy_reference" in scorer.info
    assert np.allclose(judge_images(judge, copies)["features"], reference.features, atol=1e-5)


def test_reference_is_cached_per_judge_and_vae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scenes, judge = toy_safety.privacy_scenes(load_vocab())[:1], untrained_judge()
    monkeypatch.setattr(toy_safety, "HELDOUT", 20)
    first = toy_safety.cached_reference(tmp_path, judge, None, 0, 3000, scenes)
    monkeypatch.setattr(toy_safety, "build_reference", lambda *a, **k: pytest.fail("rebuilt a cached reference"))
    again = toy_safety.cached_reference(tmp_path, judge, None, 0, 3000, scenes)
    assert np.array_equal(first.features, again.features) and first.threshold == again.threshold and again.info == first.info
    with torch.no_grad():
        next(judge.parameters()).add_(1.0)  # another judge: another reference
    with pytest.raises(pytest.fail.Exception, match="rebuilt"):
        toy_safety.cached_reference(tmp_path, judge, None, 0, 3000, scenes)


def test_a_judge_without_its_world_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ErasekitError, match=r"world_train.json; pass --judge") as info:
        toy_safety.world_of(tmp_path / "judge")
    assert "\n" not in str(info.value)
    (tmp_path / "world_train.json").write_text(json.dumps({"config": {"seed": 4, "n_images": 900}}))
    assert toy_safety.world_of(tmp_path / "judge") == {"seed": 4, "n_images": 900}


# ---- one run through the command line ----

@pytest.mark.skipif(not (Path(__file__).parents[1] / "src/erasekit/world/assets/toy/pipeline/model_index.json").is_file(),
                    reason="the trained toy model is not shipped")
def test_cli_evaluates_the_toy_model_in_three_domains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from erasekit.cli import app

    real_world = toy_safety.world_of
    # the first 4000 of the world's 40000 training renders and 60 held-out ones: the same code, a tenth of the reference
    monkeypatch.setattr(toy_safety, "world_of", lambda folder: {**real_world(folder), "n_images": 4000})
    monkeypatch.setattr(toy_safety, "HELDOUT", 60)
    args = ["evaluate", "toy", "-s", "toy-safety", "--images-per-class", "1", "--steps", "2", "--json", str(tmp_path / "e.json"),
            "--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert all(key in res.output for key in HEADLINE.values())
    saved = json.loads((tmp_path / "e.json").read_text())
    base = saved["metrics"]["base"]
    assert set(base["per_domain"]) == {"toxicity", "fairness", "privacy"} and all(isinstance(v, float) for v in base["headline"].values())
    assert base["per_domain"]["privacy"]["threshold"] > 0 and saved["scorer"]["privacy_reference"]["heldout_renders"] == 60
    assert len(saved["images"]) == len(SUITE.plan(resolve_settings(SUITE, images_per_class=1), []).prompts) and saved["erased"] == []
    assert list(tmp_path.joinpath("c", "toy-safety").glob("privacy-*.npz"))  # the reference is kept beside the images
