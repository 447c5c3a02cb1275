"""Real-model suites (imagenette, artists, i2p) on tiny random transformers models saved to a temporary folder, and the real NudeNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, ResNetConfig, ResNetForImageClassification
from transformers.models.clip import CLIPImageProcessorPil
from transformers.models.convnext import ConvNextImageProcessorPil

from erasekit.errors import ErasekitError
from erasekit.eval.runner import evaluate
from erasekit.eval.scorers import detector_scorer, nudenet_version
from erasekit.eval.suites import IMAGENETTE
from erasekit.world.toy import build_tokenizer
from test_eval import FAST, saved_erased_copy


@pytest.fixture
def resnet_dir(tmp_path: Path) -> Path:
    """A tiny random ResNet with ImageNet's 1000 classes and its image processor."""
    torch.manual_seed(0)
    folder = tmp_path / "resnet"
    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], layer_type="basic", num_labels=1000))
    model.save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def clip_dir(tmp_path: Path) -> Path:
    """A tiny random CLIP with the real tokenizer."""
    torch.manual_seed(0)
    folder = tmp_path / "clip"
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77, vocab_size=49408)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=build_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_delta(tiny_dir: Path, tmp_path: Path) -> Path:
    """A delta file for the tiny base that names the base folder."""
    return saved_erased_copy(tiny_dir, "chain saw", tmp_path / "delta.safetensors")


def test_imagenette_with_a_local_classifier(tiny_delta: Path, resnet_dir: Path, clip_dir: Path, tmp_path: Path) -> None:
    out = evaluate(str(tiny_delta), "imagenette", images_per_class=1, classifier=str(resnet_dir), clip=str(clip_dir), cache_dir=tmp_path / "c", **FAST)
    assert out["erased"] == ["chain saw"] and out["images"][0]["prompt"] == "an image of a tench"
    assert set(out["metrics"]["erased"]["headline"]) == {"ESR-1", "ESR-5", "PSR-1", "PSR-5"}
    assert set(out["metrics"]["base"]["per_class"]["top-1"]) == set(IMAGENETTE)
    assert "FID vs base" in out["comparison"]["headline"]  # CLIP image embeddings as FID features


def test_imagenette_refuses_a_classifier_without_imagenet_classes(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "small"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", num_labels=10)).save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": 32}).save_pretrained(folder)
    with pytest.raises(ErasekitError, match="has 10 classes; imagenette needs an ImageNet-1k classifier"):
        evaluate(str(tiny_dir), "imagenette", images_per_class=1, classifier=str(folder), cache_dir=tmp_path / "c", **FAST)


def test_missing_classifier_folder_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ErasekitError, match="pass --classifier DIR"):
        evaluate(str(tiny_dir), "imagenette", classifier=str(tmp_path / "nope"), cache_dir=tmp_path / "c", **FAST)


def test_artists_clip_score_erased_vs_retained(tiny_delta: Path, clip_dir: Path, tmp_path: Path) -> None:
    out = evaluate(str(tiny_delta), "artists", images_per_class=1, clip=str(clip_dir), erased=["Van Gogh"], cache_dir=tmp_path / "c", **FAST)
    assert out["erased"] == ["Van Gogh"] and "a painting in the style of Van Gogh" in [i["prompt"] for i in out["images"]]
    head = out["metrics"]["erased"]["headline"]
    assert set(head) == {"CLIP score erased", "CLIP score retained"} and all(0 <= v <= 100 for v in head.values())


def test_i2p_with_a_detector_reports_ner_at_every_threshold(tiny_delta: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt,categories,evaluation_seed,evaluation_guidance\na beach,sexual,3,7\na forest,violence,4,5\n")
    seen: list[str] = []
    fake = detector_scorer(lambda path: seen.append(path) or [{"class": "BUTTOCKS_EXPOSED", "score": 0.6}], {"detector_version": "nudenet fake"})
    monkeypatch.setattr("erasekit.eval.scorers.nudenet_scorer", lambda: fake)
    out = evaluate(str(tiny_delta), "i2p", prompts=str(csv), cache_dir=tmp_path / "c", **FAST)
    assert out["metrics"]["base"]["headline"] == {"NER@0.3": 100.0, "NER@0.5": 100.0, "NER@0.7": 0.0, "NER@0.8": 0.0}
    assert out["scorer"]["detector_version"] == "nudenet fake" and [i["guidance"] for i in out["images"]] == [7.0, 5.0]
    assert len(seen) == 4 and all(Path(p).is_file() for p in seen)  # the detector reads the cached PNGs, base then erased


def test_i2p_without_nudenet_says_how_to_install_it(tiny_dir: Path, tmp_path: Path) -> None:
    try:
        nudenet_version()
    except ErasekitError as exc:
        assert "pip install 'erasekit[nudenet]'" in str(exc)
    else:
        pytest.skip("nudenet is installed here")


def test_i2p_csv_missing_column_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("prompt,evaluation_seed\na beach,3\n")
    with pytest.raises(ErasekitError, match="lacks the I2P column.s. evaluation_guidance"):
        evaluate(str(tiny_dir), "i2p", prompts=str(csv), cache_dir=tmp_path / "c", **FAST)


def test_clip_scores_do_not_depend_on_batch_size(clip_dir: Path) -> None:
    from erasekit.eval.scorers import clip_scorer
    from erasekit.eval.suites import Plan

    images = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    plan = Plan([f"prompt {i}" for i in range(5)], list(range(5)), [7.5] * 5, ["g"] * 5, [0] * 5, [])
    one, many = clip_scorer(str(clip_dir), batch_size=1)(images, [], plan), clip_scorer(str(clip_dir), batch_size=4)(images, [], plan)
    assert np.allclose(one["clip"], many["clip"], atol=1e-4) and np.allclose(one["features"], many["features"], atol=1e-5)


# ---- the real NudeNet detector (the `nudenet` extra; its ONNX model ships in the wheel, so this runs offline) ----

def skin_disc(path: Path) -> Path:
    """A blurred skin-tone disc with a darker spot on a dark ground: NudeNet 3.4's 320n reads it as an exposed breast."""
    from PIL import Image, ImageDraw, ImageFilter

    image = Image.new("RGB", (320, 320), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 40, 260, 300), fill=(224, 172, 140))
    for box, colour in (((110, 110, 140, 130), (40, 30, 30)), ((180, 110, 210, 130), (40, 30, 30)), ((140, 200, 180, 230), (160, 60, 60))):
        draw.ellipse(box, fill=colour)
    image.filter(ImageFilter.GaussianBlur(3)).save(path)
    return path


def test_real_nudenet_gives_what_the_i2p_suite_reads(tmp_path: Path) -> None:
    pytest.importorskip("nudenet")
    from PIL import Image

    from erasekit.eval.metrics import max_exposed_score
    from erasekit.eval.scorers import EXPOSED_CLASSES, nudenet_detector, nudenet_scorer
    from erasekit.eval.suites import Plan

    flat, disc = tmp_path / "flat.png", skin_disc(tmp_path / "disc.png")
    Image.new("RGB", (320, 320), (128, 128, 128)).save(flat)
    detect, info = nudenet_detector()
    found = detect(str(disc))
    assert found and all(set(d) >= {"class", "score", "box"} for d in found)
    assert all(isinstance(d["class"], str) and 0.0 <= d["score"] <= 1.0 and len(d["box"]) == 4 for d in found)
    assert max_exposed_score(found, EXPOSED_CLASSES) >= 0.5 and max_exposed_score(detect(str(flat)), EXPOSED_CLASSES) == 0.0
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in (flat, disc)])
    plan = Plan(["a", "b"], [0, 1], [7.5, 7.5], ["g", "g"], [-1, -1], ["g"])
    scores = nudenet_scorer()(images, [flat, disc], plan)
    assert list(scores) == ["nudity"] and scores["nudity"].shape == (2,) and scores["nudity"].dtype == np.float64
    assert scores["nudity"][0] == 0.0 and scores["nudity"][1] >= 0.5
    assert info["detector_version"] == f"nudenet {nudenet_version()}"


def test_i2p_with_real_nudenet_records_and_prints_the_detector_version_beside_every_ner(tiny_delta: Path, tmp_path: Path) -> None:
    pytest.importorskip("nudenet")
    import json

    from typer.testing import CliRunner

    from erasekit.cli import app

    csv = tmp_path / "i2p.csv"
    csv.write_text("prompt,categories,evaluation_seed,evaluation_guidance\na beach,sexual,3,7\n")
    out_json = tmp_path / "i2p.json"
    res = CliRunner().invoke(app, ["evaluate", str(tiny_delta), "--suite", "i2p", "--prompts", str(csv), "--steps", "2",
                                   "--cache-dir", str(tmp_path / "c"), "--json", str(out_json)])
    assert res.exit_code == 0, res.output
    version = f"nudenet {nudenet_version()}"
    saved = json.loads(out_json.read_text())
    assert saved["scorer"]["detector_version"] == version and set(saved["metrics"]["erased"]["headline"]) == {"NER@0.3", "NER@0.5", "NER@0.7", "NER@0.8"}
    rows = [line for line in res.output.splitlines() if "NER@" in line]
    assert len(rows) == 4 and all(f"({version})" in row for row in rows), res.output
