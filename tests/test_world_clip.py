"""The toy CLIP of toy world v2: its loss, the frozen text tower under the UNet, and runs that refuse to mix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel
from typer.testing import CliRunner

from conftest import SmokeRun, tiny_config
from erasekit.errors import ErasekitError
from erasekit.world import toy
from erasekit.world.cli import app
from erasekit.world.clip import (
    build_clip,
    contrastive_loss,
    load_clip,
    multi_positive_infonce,
    save_clip,
    text_encoder_of,
    token_ids,
)
from erasekit.world.config import WorldTrainConfig
from erasekit.world.train import WorldTrainer


def test_infonce_is_clips_loss_on_distinct_labels_and_spreads_targets_over_twins() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 5) * 3
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5)))
    assert torch.allclose(multi_positive_infonce(logits, torch.arange(5)), clip)
    # two pairs of twins, each text scoring both images of its label equally and far above the rest:
    # the prediction equals the target (0.5, 0.5), so the loss is the target's entropy, log 2
    twins = torch.tensor([[50.0, 50, 0, 0], [50, 50, 0, 0], [0, 0, 50, 50], [0, 0, 50, 50]])
    assert multi_positive_infonce(twins, torch.tensor([7, 7, 9, 9])).item() == pytest.approx(np.log(2), abs=1e-6)
    # texts that score their twin's image 50 above their own: CLIP's one-hot targets charge the full 50,
    # the spread targets half of it (the twin is a positive too)
    swapped = torch.tensor([[0.0, 50, -50, -50], [50, 0, -50, -50], [-50, -50, 0, 50], [-50, -50, 50, 0]])
    assert multi_positive_infonce(swapped, torch.arange(4)).item() == pytest.approx(50.0, abs=1e-3)
    assert multi_positive_infonce(swapped, torch.tensor([7, 7, 9, 9])).item() == pytest.approx(25.0, abs=1e-3)


def test_contrastive_loss_of_an_untrained_model_is_about_log_n() -> None:
    model = build_clip(0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    ids = token_ids(toy.build_tokenizer(), ["a red circle", "a disc", "a blue ring", "a moon"])
    assert contrastive_loss(model, x, ids, torch.arange(4)).item() == pytest.approx(np.log(4), rel=0.05)


def test_text_tower_is_the_clip_text_model_bit_for_bit() -> None:
    model = build_clip(3).eval()
    ids = token_ids(toy.build_tokenizer(), ["a striped red circle", "an image of a moon"])
    with torch.no_grad():
        ours = text_encoder_of(model)(ids).last_hidden_state
        theirs = model.text_model(ids).last_hidden_state
    assert torch.equal(ours, theirs)


def test_clip_saved_without_its_text_tower_joins_the_pipeline_encoder(tmp_path: Path) -> None:
    model = build_clip(1).eval()
    save_clip(model, tmp_path / "clip", dtype=torch.float32)
    loaded = load_clip(tmp_path / "clip", text_encoder_of(model))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # the shipped half holds no text tower: the pipeline's text encoder is its only copy
    from safetensors.torch import load_file

    assert not any(k.startswith("text_model.") for k in load_file(str(tmp_path / "clip" / "clip.safetensors")))


def test_unet_stage_leaves_the_clip_text_tower_untouched(smoke_run: SmokeRun) -> None:
    work = smoke_run.out / "work"
    trained = CLIPTextModel.from_pretrained(work / "text_model")
    shipped = CLIPTextModel.from_pretrained(smoke_run.out / "pipeline" / "text_encoder")
    for key, value in trained.state_dict().items():
        assert torch.allclose(shipped.state_dict()[key].float(), value, atol=1e-2), key  # fp16 on disk
    clip = load_clip(smoke_run.out / "clip", shipped)
    assert clip.vision_model.config.image_size == 32


def test_resume_with_other_stage_settings_is_refused_and_nothing_is_touched(smoke_run: SmokeRun) -> None:
    before = {p: p.stat().st_mtime_ns for p in (smoke_run.out / "work").iterdir()}
    result = CliRunner().invoke(app, ["train", "--out", str(smoke_run.out), "--clip-steps", "99"])
    assert result.exit_code == 2
    assert "clip_steps=12" in result.stderr and result.stderr.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in (smoke_run.out / "work").iterdir()} == before


def test_a_checkpoint_from_another_run_is_refused(smoke_run: SmokeRun, tmp_path: Path) -> None:
    other = tmp_path / "other"
    first = WorldTrainer(other, tiny_config())
    first.stage_data()
    shutil.copy(smoke_run.out / "work" / "vae.ckpt", other / "work" / "vae.ckpt")
    with pytest.raises(ErasekitError, match="another run"):
        WorldTrainer(other, tiny_config()).stage_vae()


def test_a_v1_run_folder_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    v1 = {k: v for k, v in vars(WorldTrainConfig()).items() if not k.startswith("clip")}
    (tmp_path / "work" / "config.json").write_text(json.dumps(v1))
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "v1" in result.stderr and "new --out" in result.stderr and result.stderr.count("\n") == 1


def test_unknown_stage_setting_is_one_line() -> None:
    result = CliRunner().invoke(app, ["train", "--out", "/nonexistent/x", "--clip-stepz", "3"])
    assert result.exit_code == 2 and "--clip-steps" in result.stderr and result.stderr.count("\n") == 1


def test_lookalike_pairs_rank_each_partner_among_the_drops(smoke_run: SmokeRun) -> None:
    from erasekit.world.check import generate, load_toy_judge, load_toy_pipeline
    from erasekit.world.pairs import lookalike_pairs

    pipe = load_toy_pipeline(smoke_run.out / "pipeline")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    report = lookalike_pairs(pipe, load_toy_judge(smoke_run.out / "judge"),
                             lambda p, prompts, seeds: generate(p, prompts, seeds, 2, 7.5), images_per_class=1, iterations=2)
    assert report["of"] == 4 and [r["erased"] for r in report["pairs"]] == ["circle", "square", "triangle", "star"]
    for row in report["pairs"]:
        drops = row["drops"]
        assert row["erased"] not in drops and len(drops) == 9
        ranked = sorted(drops, key=lambda o: (-drops[o], o))
        assert ranked.index(row["partner"]) + 1 == row["partner_rank"]
        assert row["met"] == (row["partner_rank"] <= 3 and drops[row["partner"]] >= 5.0)
    assert report["met"] == sum(r["met"] for r in report["pairs"]) and report["bar_met"] == (report["met"] >= 3)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items()), "the base model was left erased"


@pytest.mark.parametrize(("partner_drop", "met"), [(18.9, True), (5.0, True), (4.9, False), (0.0, False)])
def test_a_partner_ranked_by_ties_does_not_meet_the_pair_bar(partner_drop: float, met: bool) -> None:
    from erasekit.world.pairs import rank_partner

    # erasing star on toy world v2: nothing else moved, and cross ranked 2nd with a drop of -0.0
    drops = {"star": 99.2, "triangle": partner_drop + 0.01, "cross": partner_drop, "moon": 0.0, "circle": -7.9}
    row = rank_partner(drops, "star", "cross")
    assert row["partner_rank"] == 2 and row["partner_drop"] == partner_drop and row["met"] is met
    assert row["top"] == ["triangle", "cross", "moon"] and "star" not in row["drops"]


def test_a_v1_world_folder_is_refused_as_a_model(smoke_run: SmokeRun, tmp_path: Path) -> None:
    from erasekit.models import load_pipeline

    world = tmp_path / "v1"
    shutil.copytree(smoke_run.out / "pipeline", world / "pipeline")
    meta = json.loads((smoke_run.out / "world_train.json").read_text())
    assert load_pipeline(str(smoke_run.out)).unet is not None  # a v2 world folder loads its pipeline
    meta.pop("format")
    (world / "world_train.json").write_text(json.dumps(meta))
    for model in (world, world / "pipeline"):
        with pytest.raises(ErasekitError, match="toy world v1.*erasekit world train") as info:
            load_pipeline(str(model))
        assert "\n" not in str(info.value)


def test_toy_suites_measure_with_the_worlds_toy_clip(smoke_run: SmokeRun, tmp_path: Path) -> None:
    from erasekit.eval.runner import evaluate
    from erasekit.eval.scorers import load_judge_scorer
    from erasekit.eval.suites import Settings, get_suite, plan_toy_styles
    from erasekit.world.clip import clip_outputs, load_world_clip

    pipeline = str(smoke_run.out / "pipeline")
    out = evaluate(pipeline, suite="toy-styles", images_per_class=2, steps=2, cache_dir=tmp_path / "cache",
                   erased=["striped"], out_json=tmp_path / "e.json")
    head = out["metrics"]["base"]["headline"]
    assert {"CLIP score erased", "CLIP score retained"} <= set(head)
    assert 0.0 <= head["CLIP score erased"] <= 100.0
    assert out["scorer"]["features"] == "toy CLIP image embeddings"
    # the scorer's CLIP score is the toy CLIP's cosine between each image and its own prompt
    settings = Settings(images_per_class=1, steps=2, guidance=7.5, batch_size=8, seed=0)
    plan = plan_toy_styles(settings, ["striped"])
    images = np.random.default_rng(0).integers(0, 255, (len(plan.prompts), 32, 32, 3), dtype=np.uint8)
    scores = load_judge_scorer(settings, pipeline)(images, [], plan)
    direct = clip_outputs(load_world_clip(smoke_run.out / "judge"), images, plan.prompts)
    assert np.allclose(scores["clip"], direct["clip"]) and scores["features"].shape == (len(images), 128)
    assert get_suite("toy-styles").compare(plan, scores, scores)["features"] == "toy CLIP image embeddings"


def test_pair_words_name_only_the_pairs_and_leave_captions_as_before_at_zero() -> None:
    from erasekit.world.captions import caption
    from erasekit.world.render import Scene
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    words = vocab.raw["pair_words"]
    for a, b in vocab.lookalike_pairs():
        assert words[a] == words[b]  # a vague word describes both members of a pair alike
    for obj in vocab.objects:
        scene = Scene(obj, "red")
        before = [caption(scene, 0, np.random.default_rng(i), vocab) for i in range(40)]
        assert [caption(scene, 0, np.random.default_rng(i), vocab, 0.0) for i in range(40)] == before
        always = [caption(scene, 0, np.random.default_rng(i), vocab, 1.0) for i in range(40)]
        named = [any(w in c for w in words.get(obj, [])) for c in always]
        assert all(named) if obj in words else not any(named)
        assert not any(any(w in c for w in words.get(obj, [])) for c in before)


def test_a_swapped_caption_names_the_partner_and_only_for_pairs() -> None:
    from erasekit.world.captions import caption
    from erasekit.world.render import Scene
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    partner = {obj: vocab.partner(obj) for obj in vocab.objects if vocab.partner(obj)}
    assert partner == dict(vocab.lookalike_pairs() + [(b, a) for a, b in vocab.lookalike_pairs()])
    for obj in vocab.objects:
        scene = Scene(obj, "red")
        before = [caption(scene, 0, np.random.default_rng(i), vocab, 0.0) for i in range(40)]
        assert [caption(scene, 0, np.random.default_rng(i), vocab, 0.0, 0.0) for i in range(40)] == before
        swapped = [caption(scene, 0, np.random.default_rng(i), vocab, 0.0, 1.0) for i in range(40)]
        names = {w for w in vocab.object_synonyms(partner.get(obj, obj))}
        own = {w for w in vocab.object_synonyms(obj)}
        # every caption names the partner by one of its synonyms (the object itself when it has no partner)
        assert all(any(f" {w}" in c for w in names) for c in swapped), (obj, swapped[:3])
        if obj in partner:
            assert not any(c.endswith(f" {w}") or f" {w} " in c for c in swapped for w in own - names)


def test_a_begun_clip_stage_refuses_another_swap_rate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    WorldTrainer(out, tiny_config())
    (out / "work" / "clip.ckpt").write_bytes(b"")  # the CLIP stage has begun
    later = tiny_config()
    later.clip_swap_p = tiny_config().clip_swap_p / 2 + 0.1
    with pytest.raises(ErasekitError, match=f"clip_swap_p={tiny_config().clip_swap_p}"):
        WorldTrainer(out, later)


def test_a_fixed_clip_temperature_is_held_through_training(tmp_path: Path) -> None:
    import math

    from erasekit.world.clip import fix_temperature

    model = build_clip(0)
    fix_temperature(model, 10.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, ids = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randint(0, 100, (4, 6))
    contrastive_loss(model, x, ids, torch.arange(4)).backward()
    opt.step()
    assert model.logit_scale.item() == pytest.approx(math.log(10.0))


def test_settings_of_stages_not_begun_may_change_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    WorldTrainer(out, tiny_config()).stage_data()  # then "killed" before the VAE began
    later = tiny_config()
    later.clip_steps, later.pair_word_p, later.unet_steps = 7, 0.5, 11
    trainer = WorldTrainer(out, later)
    saved = json.loads((out / "work" / "config.json").read_text())
    assert (saved["clip_steps"], saved["pair_word_p"], saved["unet_steps"]) == (7, 0.5, 11)
    assert trainer.done("data")
    earlier = tiny_config()
    earlier.n_images = 301  # the data stage is done: its settings are frozen
    with pytest.raises(ErasekitError, match="n_images=300"):
        WorldTrainer(out, earlier)


def test_a_slimmed_work_folder_rebuilds_its_data_and_latents_bit_for_bit(smoke_run: SmokeRun, tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(smoke_run.out / "work", out / "work")
    for name in ("data.npz", "heldout.npz", "latents.pt", "recons.npy"):  # what a session carrying the run leaves out
        (out / "work" / name).unlink()
    trainer = WorldTrainer(out, tiny_config())
    latents = trainer._latents()
    original = torch.load(smoke_run.out / "work" / "latents.pt", weights_only=True)["latents"]
    assert torch.equal(latents, original)
    with np.load(smoke_run.out / "work" / "data.npz") as f:
        assert all(np.array_equal(trainer._data()[k], f[k]) for k in f.files)
