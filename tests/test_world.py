"""The toy world: deterministic renders, the real CLIP tokenizer, a resumable smoke training, the check and its CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from typer.testing import CliRunner

from conftest import SmokeRun
from erasekit.errors import ErasekitError
from erasekit.world.check import check_world, default_toy_dir, load_toy_pipeline
from erasekit.world.cli import app
from erasekit.world.config import WorldTrainConfig
from erasekit.world.judge import Judge, judge_images
from erasekit.world.render import Scene, render
from erasekit.world.toy import build_tokenizer
from erasekit.world.train import render_dataset
from erasekit.world.vocab import load_vocab

CHECK_KEYS = {
    "judge_accuracy", "object_top1", "colour_top1", "style_top1",
    "implicit_rate_indirect", "implicit_rate_neutral", "seconds_per_64_images",
}
SHIPPED = default_toy_dir()


# -- rendering ------------------------------------------------------------------------------


def test_render_is_deterministic_by_seed() -> None:
    scene = Scene("star", "blue", "dotted", implicit=True, seed=7)
    first, again = render(scene), render(scene)
    assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, render(Scene("star", "blue", "dotted", implicit=True, seed=8)))


def test_every_object_colour_style_and_implicit_combination_renders_visibly_and_distinctly() -> None:
    vocab = load_vocab()
    background = np.array(vocab.raw["background"], dtype=np.int16)
    seen: dict[bytes, tuple] = {}
    for combo in product(vocab.objects, vocab.colours, vocab.styles, (False, True)):
        # one seed for all: position, size and colour jitter are equal, so only the content can differ
        image = render(Scene(*combo, seed=3))
        foreground = np.abs(image.astype(np.int16) - background).max(axis=2) > 24
        assert foreground.sum() >= 20, f"{combo} draws almost nothing"
        key = image.tobytes()
        assert key not in seen, f"{combo} renders exactly like {seen.get(key)}"
        seen[key] = combo
    assert len(seen) == len(vocab.objects) * len(vocab.colours) * len(vocab.styles) * 2


@pytest.mark.parametrize(
    ("scene", "word"),
    [(Scene("blob", "red"), "object"), (Scene("circle", "mauve"), "colour"), (Scene("circle", "red", "cubist"), "style")],
)
def test_render_rejects_unknown_names_with_a_one_line_error(scene: Scene, word: str) -> None:
    with pytest.raises(ErasekitError, match=f"unknown {word}") as info:
        render(scene)
    assert "\n" not in str(info.value)


# -- tokenizer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("A Photo of a CAT", [49406, 320, 1125, 539, 320, 2368, 49407]),  # CLIP lower-cases
        ("hello world", [49406, 3306, 1002, 49407]),
        ("!", [49406, 256, 49407]),  # the first byte's end-of-word token follows the 256 byte tokens
    ],
)
def test_tokenizer_matches_clip_on_known_strings(text: str, ids: list[int]) -> None:
    assert build_tokenizer()(text).input_ids == ids


def test_tokenizer_has_clips_vocabulary_and_pads_to_77_with_end_of_text() -> None:
    tokenizer = build_tokenizer()
    assert len(tokenizer) == 49408
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(ids[7:]) == {49407}


# -- training (tiny, in-process) ------------------------------------------------------------


def test_smoke_training_decreases_the_unet_loss(smoke_run: SmokeRun) -> None:
    losses = smoke_run.unet_losses
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_resumed_run_skips_finished_stages_and_completes(smoke_run: SmokeRun) -> None:
    assert smoke_run.resumed_stages == ["clip", "judge", "unet"]
    work = smoke_run.out / "work"
    assert (work / "vae.done").read_bytes() == smoke_run.vae_done_before
    assert all((work / f"{stage}.done").exists() for stage in ("data", "vae", "clip", "judge", "unet", "export"))
    meta = json.loads((smoke_run.out / "world_train.json").read_text())
    assert meta["format"] == 2 and set(meta["seconds"]) == {"data", "vae", "clip", "judge", "unet"}
    assert meta["devices"] == dict.fromkeys(meta["seconds"], "cpu")
    assert set(meta["clip_zero_shot"]) == {"object", "colour", "style"}


def test_smoke_training_exports_a_pipeline_that_loads_and_generates(smoke_run: SmokeRun) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(smoke_run.out / "pipeline", dtype=torch.float32)
    assert pipe.unet.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert Judge.load(smoke_run.out / "judge").counts["object"] == len(load_vocab().objects)


def test_cli_check_json_prints_exactly_one_object_with_every_bar(smoke_run: SmokeRun) -> None:
    args = ["check", "--json", "--no-pairs", "--images-per-class", "1", "--steps", "1",
            "--pipeline", str(smoke_run.out / "pipeline"), "--judge", str(smoke_run.out / "judge")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == CHECK_KEYS
    assert set(report["judge_accuracy"]) == {"object", "colour", "style", "implicit"}
    rates = [report[k] for k in CHECK_KEYS - {"judge_accuracy", "seconds_per_64_images"}]
    assert all(0.0 <= v <= 1.0 for v in rates + list(report["judge_accuracy"].values()))
    assert report["seconds_per_64_images"] > 0


def test_cli_check_table_shows_every_measure_next_to_its_bar() -> None:
    from rich.console import Console

    from erasekit.world.cli import _print_table

    report = {
        "judge_accuracy": {"object": 0.99, "colour": 1.0, "style": 0.995, "implicit": 1.0},
        "object_top1": 0.93, "colour_top1": 1.0, "style_top1": 0.85,
        "implicit_rate_indirect": 0.6, "implicit_rate_neutral": 0.02, "seconds_per_64_images": 8.25,
    }
    console = Console(record=True, width=120)
    _print_table(report, console)
    text = console.export_text()
    for expected in ("judge accuracy (style", "99.5%", "object top-1", "93.0%", "neutral prompts", "2.0%", "8.25", "<= 10"):
        assert expected in text


def test_check_rejects_a_corrupt_pipeline_folder(smoke_run: SmokeRun, tmp_path: Path) -> None:
    broken = tmp_path / "pipeline"
    shutil.copytree(smoke_run.out / "pipeline", broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ErasekitError, match="cannot load the pipeline") as info:
        load_toy_pipeline(broken)
    assert "\n" not in str(info.value)


def test_check_rejects_a_missing_folder_with_exit_code_2(tmp_path: Path) -> None:
    with pytest.raises(ErasekitError, match="no judge"):
        check_world(tmp_path / "pipeline", tmp_path / "judge")
    result = CliRunner().invoke(app, ["check", "--pipeline", str(tmp_path / "p"), "--judge", str(tmp_path / "j")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def test_cli_train_resumes_a_finished_run_without_retraining(smoke_run: SmokeRun) -> None:
    before = (smoke_run.out / "work" / "unet.done").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["train", "--out", str(smoke_run.out)])
    assert result.exit_code == 0, result.output
    assert (smoke_run.out / "work" / "unet.done").stat().st_mtime_ns == before
    assert json.loads(result.stdout.strip().splitlines()[-1])["config"]["n_images"] == 300


def test_cli_train_refuses_a_folder_that_holds_no_run(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "exists" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# -- render CLI -----------------------------------------------------------------------------


def test_cli_render_writes_a_preview_grid(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    args = ["render", "--out", str(out), "--objects", "circle,ring", "--colours", "red,blue", "--styles", "plain,dotted,outlined", "--implicit", "--scale", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(out) as grid:
        # 2 rows x 6 columns of 32-pixel tiles with 2-pixel padding, upscaled twice, below two header lines
        # (styles, then colours) and right of the object names
        width, height = grid.size
        assert height == (2 * 34 + 2) * 2 + 32 and width > (6 * 34 + 2) * 2 + 20
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_cli_render_unknown_object_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["render", "--out", str(out), "--objects", "circle,blob"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown object 'blob'") and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_render_refuses_an_existing_out_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    out.write_bytes(b"keep me")
    refused = CliRunner().invoke(app, ["render", "--out", str(out), "--objects", "moon"])
    assert refused.exit_code == 2 and "exists" in refused.stderr
    assert out.read_bytes() == b"keep me"
    replaced = CliRunner().invoke(app, ["render", "--out", str(out), "--objects", "moon", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert out.read_bytes().startswith(b"\x89PNG")


# -- the shipped model ----------------------------------------------------------------------

needs_shipped_pipeline = pytest.mark.skipif(
    not (SHIPPED / "pipeline" / "model_index.json").exists(),
    reason="the shipped toy pipeline (src/erasekit/world/assets/toy/pipeline) is not built yet; `erasekit world train` makes it",
)
needs_shipped_judge = pytest.mark.skipif(
    not (SHIPPED / "judge" / "judge.safetensors").exists(),
    reason="the shipped judge (src/erasekit/world/assets/toy/judge) is not built yet; `erasekit world train` makes it",
)


@needs_shipped_pipeline
def test_shipped_pipeline_loads_with_from_pretrained_and_generates() -> None:
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED / "pipeline", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    images = pipe(["a red circle", "a blue star"], num_inference_steps=10, generator=generators, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert images.std() > 0.05, "the shipped model generates flat images"


@needs_shipped_judge
def test_shipped_judge_is_at_least_98_percent_accurate_on_fresh_renders() -> None:
    held = render_dataset(200, seed=777, offset=30_000_000)
    probs = judge_images(Judge.load(SHIPPED / "judge"), held["images"])
    for head in ("object", "colour", "style"):
        assert np.mean(probs[head].argmax(1) == held[head]) >= 0.98, head
    assert np.mean((probs["implicit"] >= 0.5) == (held["implicit"] == 1)) >= 0.98


def test_the_shipped_world_is_v2_with_its_toy_clip_and_passes_the_v1_refusal() -> None:
    """The package ships a v2 world (frozen toy CLIP) that the v1 check accepts for what it is, not by exemption."""
    import json

    from erasekit.world.clip import find_world_clip
    from erasekit.world.config import check_world_folder

    meta = json.loads((SHIPPED / "world_train.json").read_text())
    assert meta["format"] == 2 and meta["config"]["pair_word_p"] > 0 and meta["config"]["clip_swap_p"] > 0
    assert meta["config"] == {**asdict(WorldTrainConfig()), "threads": meta["config"]["threads"]}, "the defaults rebuild the shipped world"
    assert find_world_clip(SHIPPED / "judge") is not None, "the shipped world carries clip/ beside its pipeline"
    assert check_world_folder(SHIPPED) == SHIPPED / "pipeline"
    world = [f for f in SHIPPED.rglob("*") if f.is_file() and "janus" not in f.relative_to(SHIPPED).parts]  # the toy Janus has its own budget
    assert sum(f.stat().st_size for f in world) < 40 * 2**20, "the shipped world stays under 40 MB"
