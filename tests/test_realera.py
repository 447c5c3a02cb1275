"""RealEra: where the mined and beyond embeddings lie, which rows the closed form aligns, and what the fine-tuning erases."""

from __future__ import annotations

import pytest
import torch

import erasekit
import erasekit.methods.realera as realera
from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.methods.closed_form import weights_of


def test_mined_embeddings_lie_within_the_bound_and_the_band() -> None:
    config = realera.RealEraConfig(n_mined=40, radius=0.6, band_low=0.85, band_high=0.99)
    w = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    near = realera.mine(w, config, torch.Generator().manual_seed(0))
    assert near.shape == (40, 2, 16)
    dn = (near - w).flatten(1).norm(dim=1) / w.norm()
    cn = realera.cosine(near, w)
    assert bool((dn <= 0.6 + 1e-6).all()) and bool(((cn >= 0.85) & (cn <= 0.99)).all())
    assert torch.equal(near, realera.mine(w, config, torch.Generator().manual_seed(0)))  # a function of the seed


def test_beyond_words_are_the_nearest_below_the_band_never_the_concepts_own() -> None:
    pipe = tiny_pipeline()
    w = realera.concept_rows(pipe, "circle")
    config = realera.RealEraConfig(n_beyond=5, band_low=0.2, beyond="toy")
    words = realera.beyond_words(pipe, w, "circle", config)
    assert len(words) == 5 and "circle" not in words
    family = realera.family_of(pipe)
    sims = [float(torch.nn.functional.cosine_similarity(realera.concept_rows(pipe, x).mean(0), w.mean(0), dim=0)) for x in words]
    assert all(s < 0.2 for s in sims) and sims == sorted(sims, reverse=True)
    assert family.name == "sd"


def test_a_band_out_of_reach_is_refused_in_one_line() -> None:
    config = realera.RealEraConfig(n_mined=4, radius=0.01, band_low=0.5, band_high=0.6)  # |d| <= 1 % of |w| keeps cos > 0.99
    with pytest.raises(ErasekitError, match="land in the cosine band"):
        realera.mine(torch.ones(1, 8), config, torch.Generator().manual_seed(0))
    with pytest.raises(ErasekitError, match="band_low"):
        erasekit.erase(tiny_pipeline(), "circle", method="realera", band_low=0.9, band_high=0.8)


def test_rows_through_eos_are_aligned_from_each_texts_last_token() -> None:
    hidden = torch.arange(10.0)[:, None].expand(10, 3)
    guide = 100 + torch.arange(10.0)[:, None].expand(10, 3)
    concept, g = realera.through_eos(hidden, 2, guide, 0)  # concept ends at row 2, the empty guide's last token is BOS (0)
    assert concept[:, 0].tolist() == list(range(2, 10)) and g[:, 0].tolist() == [100 + i for i in range(8)]
    concept, g = realera.through_eos(hidden, 1, guide, 3)
    assert concept[:, 0].tolist() == list(range(1, 8)) and g[:, 0].tolist() == [100 + i for i in range(3, 10)]


def test_the_closed_form_stage_sends_the_neighbourhood_to_the_guide_and_keeps_the_rest() -> None:
    pipe = tiny_pipeline()
    config = realera.RealEraConfig(n_mined=4)
    w = realera.concept_rows(pipe, "circle")
    near = realera.mine(w, config, torch.Generator().manual_seed(0))
    keys, guide, keep = realera.closed_form_rows(pipe, "circle", realera.mined_conds(pipe, "circle", near), ["square", "star"], config, ["a red square"])
    from erasekit.methods.closed_form import EditRows, uce_edit

    before = weights_of(pipe)
    after = uce_edit(before, EditRows(keys, guide, keep), config.lam, 1.0, config.preserve_scale)
    unkept = uce_edit(before, EditRows(keys, guide, keep), config.lam, 1.0, 0.0)  # the same edit without the beyond rows
    for name, w0 in before.items():
        moved_before = ((keys @ w0.T - guide @ w0.T) ** 2).mean()
        moved_after = ((keys @ after[name].T - guide @ w0.T) ** 2).mean()
        drift = ((keep @ after[name].T - keep @ w0.T) ** 2).mean()
        drift_unkept = ((keep @ unkept[name].T - keep @ w0.T) ** 2).mean()
        assert moved_after < 0.5 * moved_before, name
        assert drift < 0.5 * drift_unkept, name


def test_the_fine_tuning_erases_every_mined_embedding_and_keeps_the_beyond_ones() -> None:
    pipe = tiny_pipeline()
    result = erasekit.erase(pipe, "circle", method="realera", iterations=12, ddim_steps=3, lr=1e-3, n_mined=2, n_beyond=2, beyond="toy", retain_prompts="toy")
    targets = {r["target"] for r in result.history if "step" in r}
    assert "circle" in targets or any("(mined" in t for t in targets)
    assert len(targets) > 1  # the mined embeddings are erased too, not only the word
    hood = result.history[-1]["neighbourhood"]
    assert hood["mined"] == 2 * len(realera.TEMPLATES) and len(hood["beyond"]) == 2 and hood["closed_form"]
    assert {r["target"] for r in result.history if "step" in r} <= {"circle", *(f"circle (mined {i})" for i in range(hood["mined"]))}
    assert all(r["preserve_loss"] >= 0 for r in result.history if "step" in r)
    assert result.concepts == ("circle",) and result.preserve == ()
    original = weights_of(tiny_pipeline())
    changed = {k.removeprefix("unet.") for k, v in result.delta.items() if k.removeprefix("unet.") in original and not torch.equal(v.double(), original[k.removeprefix("unet.")])}
    assert changed == set(original)  # every key/value map of the cross-attention was edited
    assert all(".attn2." in k for k in result.delta)
    with pytest.raises(ErasekitError, match="drop --preserve"):
        erasekit.erase(tiny_pipeline(), "circle", method="realera", preserve=["ring"], iterations=1)
