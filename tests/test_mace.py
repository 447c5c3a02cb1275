"""MACE: the fusion's closed form, the attention probe and loss, the masked images, and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import erasekit
from conftest import tiny_pipeline
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.methods import mace, mace_parts


def test_fusion_acts_as_each_concepts_own_update_on_its_own_rows() -> None:
    g = torch.Generator().manual_seed(0)
    d = 6
    base = {"m.weight": torch.randn(4, d, generator=g, dtype=torch.float64)}
    e1 = torch.cat([torch.randn(8, 3, generator=g, dtype=torch.float64), torch.zeros(8, 3, dtype=torch.float64)], 1)  # first 3 coordinates
    e2 = torch.cat([torch.zeros(8, 3, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)], 1)  # last 3
    w1 = {"m.weight": torch.randn(4, d, generator=g, dtype=torch.float64)}
    w2 = {"m.weight": torch.randn(4, d, generator=g, dtype=torch.float64)}
    fused = mace_parts.fuse(base, [w1, w2], [e1, e2], torch.zeros(0, d, dtype=torch.float64), 0.0, ridge=1e-9)["m.weight"]
    assert torch.allclose(e1 @ fused.T, e1 @ w1["m.weight"].T, atol=1e-6)
    assert torch.allclose(e2 @ fused.T, e2 @ w2["m.weight"].T, atol=1e-6)
    # retained rows pull the fused map back to the base on them
    keep = torch.randn(16, d, generator=g, dtype=torch.float64)
    held = mace_parts.fuse(base, [w1], [e1], keep, 1e6)["m.weight"]
    assert torch.allclose(keep @ held.T, keep @ base["m.weight"].T, atol=1e-3)


def test_attention_loss_is_the_squared_attention_of_the_concept_tokens_inside_the_mask() -> None:
    probs = torch.zeros(2, 4, 3)  # 1 image x 2 heads, 2 x 2 queries, 3 tokens
    probs[:, :, 1] = torch.tensor([0.5, 0.1, 0.2, 0.3])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # queries 0 and 3
    loss = mace_parts.attention_loss([(probs, 2)], [1], mask)
    assert loss.item() == pytest.approx(0.5**2 + 0.3**2)
    assert mace_parts.attention_loss([(probs, 2)], [2], mask).item() == 0.0


def test_the_probe_leaves_the_unets_output_unchanged_and_records_every_cross_attention_layer() -> None:
    pipe = tiny_pipeline()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample
        store: list[tuple[torch.Tensor, int]] = []
        with mace_parts.probed(pipe.unet, store):
            probed = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample
        again = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=cond).sample
    assert torch.allclose(probed, plain, rtol=1e-4, atol=1e-5) and torch.equal(again, plain)
    layers = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    assert len(store) == len(layers)
    assert all(torch.allclose(p.sum(-1), torch.ones(())) for p, _ in store)


def test_word_spans_count_from_the_begin_token() -> None:
    tok = tiny_pipeline().tokenizer
    assert mace.word_span(tok, "an image of a {}", "circle") == (5, 6)
    assert mace.word_span(tok, "an image of a {}", "") == (5, 5)
    assert mace.word_span(tok, "{} on a page", "round disk") == (1, 3)


def test_toy_masks_cover_the_object_and_not_the_background() -> None:
    images, masks = mace_parts.toy_images("circle", 3, 0)
    assert images.shape[0] == masks.shape[0] == 3 and images.shape[1:3] == masks.shape[1:]
    assert 0.05 < masks.mean() < 0.6 and masks[:, 0, 0].sum() == 0  # the corner is background
    with pytest.raises(ErasekitError, match="only of the toy world's objects"):
        mace_parts.toy_images("giraffe", 1, 0)


def _write(folder: Path, name: str, size: tuple[int, int], mask_size: tuple[int, int] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size[::-1], 3), 200, np.uint8)).save(folder / f"{name}.png")
    if mask_size is not None:
        Image.fromarray(np.full(mask_size[::-1], 255, np.uint8)).save(folder / f"{name}_mask.png")


def test_a_mask_folder_that_does_not_match_its_images_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "ok", "a", (16, 16), (16, 16))
    images, masks = mace_parts.folder_images(tmp_path / "ok")
    assert images.shape == (1, 16, 16, 3) and masks.min() == 1.0
    _write(tmp_path / "size", "a", (16, 16), (8, 8))
    with pytest.raises(ErasekitError, match="make them the same size"):
        mace_parts.folder_images(tmp_path / "size")
    _write(tmp_path / "missing", "a", (16, 16), None)
    with pytest.raises(ErasekitError, match="has no mask a_mask.png"):
        mace_parts.folder_images(tmp_path / "missing")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["erase", "-c", "circle", "--method", "mace", "--images", str(tmp_path / "size"), "--out", str(out)])
    assert res.exit_code == 2 and "make them the same size" in res.output and "Traceback" not in res.output
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_concept_list_with_duplicates_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["erase", "-c", "circle", "-c", "square", "-c", "Circle", "--method", "mace", "--out", str(out)])
    assert res.exit_code == 2 and "is given twice" in res.output and len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_each_lora_drives_its_concepts_attention_down_and_the_fusion_writes_only_keys_and_values() -> None:
    pipe = tiny_pipeline()
    result = erasekit.erase(pipe, ["circle", "square"], method="mace", images="toy", iterations=40, lr=1e-2, n_images=4, retain_prompts="toy")
    for concept in ("circle", "square"):
        losses = [r["erase_loss"] for r in result.history if r.get("target") == concept]
        assert len(losses) == 40 and np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), concept
    assert result.history[-1]["fusion"]["concepts"] == 2
    assert result.delta and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in result.delta)


def test_the_loss_reads_the_words_tokens_in_the_mask_by_default_and_the_toy_presets_wider_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.methods.mace_parts as parts
    from erasekit.methods.mace import TRAIN_TEMPLATES, word_span

    seen: list[tuple[list[int], torch.Tensor]] = []
    real = parts.attention_loss

    def spy(store: Any, tokens: list[int], mask: torch.Tensor) -> torch.Tensor:
        seen.append((list(tokens), mask.clone()))
        return real(store, tokens, mask)

    monkeypatch.setattr(parts, "attention_loss", spy)
    pipe = tiny_pipeline()
    spans = [list(range(*word_span(pipe.tokenizer, t, "circle"))) for t in TRAIN_TEMPLATES]
    length = pipe.tokenizer.model_max_length
    erasekit.erase(pipe, "circle", method="mace", budget="tiny", iterations=3)
    assert all(tokens in spans and 0 < float(mask.mean()) < 1 for tokens, mask in seen), "the paper: the word's tokens, the object's pixels"
    seen.clear()
    erasekit.erase(pipe, "circle", method="mace", budget="tiny", iterations=3, tokens="word+after", region="image")
    assert all(tokens in [list(range(s[0], length)) for s in spans] and bool((mask == 1).all()) for tokens, mask in seen)
    with pytest.raises(ErasekitError, match="word or word\\+after"):
        erasekit.erase(pipe, "circle", method="mace", budget="tiny", tokens="all")
    with pytest.raises(ErasekitError, match="mask or image"):
        erasekit.erase(pipe, "circle", method="mace", budget="tiny", region="box")
