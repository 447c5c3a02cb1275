"""The toy Janus trainer (`erasekit world janus`) and its check, at tiny sizes: a few steps of each stage."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from erasekit.autoregressive import generate, image_size, image_token_count, load_janus
from erasekit.errors import ErasekitError
from erasekit.world.janus_model import JanusTrainConfig, build_toy_janus, tokenize_images, vq_losses
from erasekit.world.janus_train import JanusTrainer

TINY = JanusTrainConfig(
    n_images=24, codebook=16, vq_steps=3, vq_batch=4, width=32, layers=1, heads=2, clip_merges=510,
    lm_steps=3, lm_batch=4, checkpoint_every=1, threads=1,
)
TINY_FLAGS = ["--n-images", "24", "--codebook", "16", "--vq-steps", "2", "--vq-batch", "4", "--width", "32", "--layers", "1",
              "--heads", "2", "--clip-merges", "510", "--lm-batch", "4", "--steps", "2"]


class Stop(Exception):
    """Stands for a kill between two steps."""


def stop_at(stage: str, step: int):  # noqa: ANN201  (a progress callback)
    def progress(s: str, k: int, total: int, info: dict) -> None:
        if (s, k) == (stage, step):
            raise Stop

    return progress


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted tiny run (its folder)."""
    out = tmp_path_factory.mktemp("janus-world") / "run"
    JanusTrainer(out, TINY).run()
    return out


def test_stages_save_a_janus_folder_that_transformers_loads_and_generate_draws_from(trained: Path) -> None:
    from transformers import JanusForConditionalGeneration

    janus = load_janus(trained / "janus")
    assert isinstance(janus.model, JanusForConditionalGeneration)
    assert (image_size(janus.model), image_token_count(janus.model)) == (32, 64)  # the toy world's 32 pixels, an 8 x 8 grid
    images = generate(janus, ["a red circle", "a blue star"], [0, 1])
    assert images.shape == (2, 32, 32, 3) and images.dtype.name == "uint8"
    assert (images == generate(janus, ["a red circle", "a blue star"], [0, 1])).all()  # a seed per prompt means the same image
    record = json.loads((trained / "janus" / "janus_train.json").read_text())
    assert record["config"]["lm_steps"] == 3 and set(record["seconds"]) == {"data", "vq", "tokens", "lm"}
    assert record["size_bytes"] < 20_000_000 and not (trained / "janus.tmp").exists()
    assert (trained / "janus" / "generation_config.json").is_file() and (trained / "janus" / "tokenizer.json").is_file()


def test_lm_stage_trains_the_generation_path_and_leaves_the_vq_model_as_the_vq_stage_left_it(trained: Path) -> None:
    weights = load_file(str(trained / "janus" / "model.safetensors"))
    vq = load_file(str(trained / "work" / "vq.safetensors"))
    assert all(torch.equal(weights[f"model.vqmodel.{k}"], v) for k, v in vq.items())
    fresh, _ = build_toy_janus(TINY, 32)
    before = dict(fresh.named_parameters())
    changed = {k for k, v in weights.items() if k in before and not torch.equal(v, before[k].detach())}
    assert any(k.startswith("model.language_model.") for k in changed) and any(k.startswith("model.generation_head.") for k in changed)
    assert not any(k.startswith("model.vision_model.") for k in changed)  # the understanding encoder is never trained


def test_tokens_decode_with_transformers_to_what_the_vq_trainer_reconstructs() -> None:
    model, _ = build_toy_janus(TINY, 32)
    vq = model.model.vqmodel.eval()
    images = (torch.rand(3, 32, 32, 3) * 255).to(torch.uint8)
    tokens = tokenize_images(vq, images)
    assert tokens.shape == (3, 64)
    with torch.no_grad():
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        recon_loss, _, index = vq_losses(vq, x, 0.25)
        decoded = model.decode_image_tokens(tokens).permute(0, 3, 1, 2)  # transformers' own decode path
    assert torch.equal(index.flatten(1), tokens)
    expected = torch.nn.functional.mse_loss(decoded, x) + 0.5 * torch.nn.functional.l1_loss(decoded, x)
    assert torch.allclose(recon_loss, expected, atol=1e-6)


def test_a_run_stopped_at_checkpoints_and_resumed_ends_bit_identical_to_an_uninterrupted_one(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    for stage, step in (("vq", 2), ("lm", 1)):
        with pytest.raises(Stop):
            JanusTrainer(out, TINY, stop_at(stage, step)).run()
    assert json.loads((out / "work" / "config.json").read_text())["run_id"]
    JanusTrainer(out, TINY).run()
    mine, theirs = load_file(str(out / "janus" / "model.safetensors")), load_file(str(trained / "janus" / "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_resuming_with_other_settings_for_a_begun_stage_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Stop):
        JanusTrainer(out, TINY, stop_at("vq", 1)).run()
    with pytest.raises(ErasekitError, match="resume it with --codebook 16") as info:
        JanusTrainer(out, replace(TINY, codebook=32))
    assert "\n" not in str(info.value)
    JanusTrainer(out, replace(TINY, lm_steps=5, threads=0))  # the lm stage has not begun: its settings may still change
    assert json.loads((out / "work" / "config.json").read_text())["lm_steps"] == 5


def test_janus_check_judges_every_object_colour_prompt_with_rates_in_range(trained: Path) -> None:
    from erasekit.world.janus_check import janus_check

    seen = []
    result = janus_check(trained / "janus", images_per_prompt=1, progress=lambda stage, *a: seen.append(stage))
    assert result["images"] == 60  # 10 objects x 6 colours
    assert all(0.0 <= result[k] <= 1.0 for k in ("object_top1", "colour_top1", "style_top1"))
    assert result["seconds_per_64_images"] > 0 and result["met"] is (result["object_top1"] >= 0.8 and result["colour_top1"] >= 0.8)
    assert seen[-1] == "done"


def test_cli_trains_checks_and_refuses_other_settings_in_one_line(tmp_path: Path) -> None:
    from erasekit.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["world", "janus", "--out", str(out), *TINY_FLAGS, "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert load_janus(out / "janus") is not None
    res = runner.invoke(app, ["world", "janus", "--out", str(out), *TINY_FLAGS, "--seed", "3"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [res.output.strip()] and "--seed 0" in res.output
    res = runner.invoke(app, ["world", "check-janus", "--json", "--janus", str(out / "janus"), "--images-per-prompt", "1"])
    assert res.exit_code == 0, res.output
    assert 0.0 <= json.loads(res.output)["object_top1"] <= 1.0


def test_world_train_and_check_with_family_janus_are_world_janus_and_check_janus(tmp_path: Path) -> None:
    from erasekit.cli import app

    runner = CliRunner()
    for command, out in ((["world", "janus"], tmp_path / "a"), (["world", "train", "--family", "janus"], tmp_path / "b")):
        res = runner.invoke(app, [*command, "--out", str(out), *TINY_FLAGS, "--threads", "1"])
        assert res.exit_code == 0, res.output
    weights = [(out / "janus" / "model.safetensors").read_bytes() for out in (tmp_path / "a", tmp_path / "b")]
    assert weights[0] == weights[1]
    rates = []
    for command in (["world", "check-janus", "--janus"], ["world", "check", "--family", "janus", "--pipeline"]):
        res = runner.invoke(app, [*command, str(tmp_path / "a" / "janus"), "--json"])
        assert res.exit_code == 0, res.output
        rates.append({k: v for k, v in json.loads(res.output).items() if k != "seconds_per_64_images"})
    assert rates[0] == rates[1]
    res = runner.invoke(app, ["world", "train", "--family", "flux", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "sd, janus" in res.output and not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags", [["--grid", "5"], ["--vq-channels", "48"], ["--cfg-dropout", "1.5"], ["--lm-lr", "nan"]])
def test_cli_refuses_sizes_the_model_cannot_take_in_one_line_and_writes_nothing(tmp_path: Path, flags: list[str]) -> None:
    from erasekit.cli import app

    res = CliRunner().invoke(app, ["world", "janus", "--out", str(tmp_path / "x"), *flags])
    assert res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "x").exists()


def test_dropped_captions_are_exactly_janus_unconditional_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.autoregressive.janus as janus_module

    seen = []
    real = janus_module.image_logits

    def spy(model, prompts, tokens):  # noqa: ANN001, ANN202
        seen.append(prompts)
        return real(model, prompts, tokens)

    monkeypatch.setattr(janus_module, "image_logits", spy)
    out = tmp_path / "run"
    JanusTrainer(out, replace(TINY, lm_steps=1, cfg_dropout=1.0)).run()
    janus = load_janus(out / "janus")
    ids = seen[0].input_ids
    keep = (ids == janus.bos_id) | (ids == janus.boi_id) | (seen[0].attention_mask == 0)
    assert (ids[~keep] == janus.pad_id).all() and (ids[:, -1] == janus.boi_id).all()  # BOS ... pads ... <begin_of_image>
    assert (ids == janus.bos_id).sum() == len(ids)


def test_dead_codes_move_onto_encoder_outputs_and_usage_restarts() -> None:
    from erasekit.world.janus_model import restart_dead_codes

    model, _ = build_toy_janus(TINY, 32)
    vq = model.model.vqmodel
    usage = torch.zeros(TINY.codebook, dtype=torch.long)
    usage[:10] = 5
    before = vq.quantize.embedding.weight.detach().clone()
    z = torch.randn(2, TINY.code_dim, 8, 8)
    assert restart_dead_codes(vq, usage, z, torch.Generator().manual_seed(0)) == TINY.codebook - 10
    after = vq.quantize.embedding.weight.detach()
    assert torch.equal(after[:10], before[:10]) and not usage.any()
    vectors = z.permute(0, 2, 3, 1).reshape(-1, TINY.code_dim)
    assert all((vectors == row).all(1).any() for row in after[10:])


SHIPPED_JANUS = Path(__file__).resolve().parents[1] / "src/erasekit/world/assets/toy/janus"


@pytest.mark.skipif(not (SHIPPED_JANUS / "config.json").is_file(), reason="the toy Janus is not shipped in this checkout")
def test_the_shipped_toy_janus_loads_with_transformers_classes_and_draws_what_it_is_asked() -> None:
    """`--model toy-janus`: a JanusForConditionalGeneration under 20 MB, its training record beside it, prompts drawn as asked."""
    from transformers import JanusForConditionalGeneration

    from erasekit.models import load_pipeline, toy_janus_dir
    from erasekit.world.judge import Judge, judge_images
    from erasekit.world.vocab import load_vocab

    assert toy_janus_dir() == SHIPPED_JANUS
    assert sum(f.stat().st_size for f in SHIPPED_JANUS.iterdir()) < 20_000_000, "the toy Janus stays within its 20 MB budget"
    record = json.loads((SHIPPED_JANUS / "janus_train.json").read_text())
    assert record["codes_used"] == record["config"]["codebook"] and record["final_loss"] < 2.0
    assert isinstance(JanusForConditionalGeneration.from_pretrained(SHIPPED_JANUS), JanusForConditionalGeneration)
    janus = load_pipeline("toy-janus", autoregressive=True)
    objects = ["circle", "square", "star", "ring"]
    images = generate(janus, [f"a red {o}" for o in objects], [0, 1, 2, 3])
    vocab = load_vocab()
    judged = judge_images(Judge.load(SHIPPED_JANUS.parent / "judge"), images)["object"].argmax(1)
    assert images.shape == (4, image_size(janus.model), image_size(janus.model), 3)
    assert sum(vocab.objects[k] == o for k, o in zip(judged, objects)) >= 3, [vocab.objects[k] for k in judged]
