"""ItD: the top-k SAE, the deactivating hook on a case with a known answer, and the method end to end on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import erasekit
from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.hooks import encoder_layers
from erasekit.methods.itd import build_itd_hook, calibrate, classify, concept_mask, layer_index
from erasekit.methods.sae import TopKSAE, sae_from_tensors, sae_tensors, train_sae


def identity_sae(width: int = 4) -> dict[str, torch.Tensor]:
    """An SAE whose features are the axes: z = relu(h), h rebuilt exactly where h >= 0."""
    sae = TopKSAE(width, width, width)
    with torch.no_grad():
        sae.decoder.copy_(torch.eye(width))
        sae.encoder.weight.copy_(torch.eye(width))
        sae.encoder.bias.zero_()
        sae.b_pre.zero_()
    return sae_tensors(sae)


def test_the_hook_subtracts_exactly_the_concept_features_of_flagged_prompts_and_nothing_else() -> None:
    tensors = {**identity_sae(), "features": torch.tensor([0])}
    hook = build_itd_hook(tensors, {"k": 4, "scale": 0.0, "threshold": 0.5, "selective": True}, 4)
    h = torch.tensor([[[3.0, 1.0, 0.0, -2.0], [0.5, 0.0, 0.0, 0.0]],   # share of feature 0: 3/4 at token 0 -> flagged
                      [[1.0, 2.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])  # share 1/5 -> left alone
    out = hook(h)
    assert torch.equal(out[0], torch.tensor([[0.0, 1.0, 0.0, -2.0], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(out[1], h[1]), "a prompt below the threshold must pass through bit for bit"
    leaf = h.clone().requires_grad_(True)
    hook(leaf).sum().backward()  # the attack searches through the hooked encoder: the hook must pass gradients on
    assert leaf.grad is not None and torch.equal(leaf.grad[1], torch.ones(2, 4))
    half = build_itd_hook(tensors, {"k": 4, "scale": 0.5, "threshold": 0.5, "selective": False}, 4)(h)
    assert torch.equal(half[1], torch.tensor([[0.5, 2.0, 2.0, 0.0], [0.0, 1.0, 0.0, 0.0]])), "selective off: every prompt, scaled"


def test_the_classifier_reads_the_detector_features_and_the_hook_removes_the_deactivated_ones() -> None:
    tensors = {**identity_sae(), "features": torch.tensor([0, 1]), "detect": torch.tensor([2])}
    hook = build_itd_hook(tensors, {"k": 4, "scale": 0.0, "threshold": 0.5, "selective": True}, 4)
    h = torch.tensor([[[1.0, 1.0, 3.0, 0.0]],    # detector share 3/5 -> flagged: features 0 and 1 removed, 2 kept
                      [[3.0, 3.0, 1.0, 0.0]]])   # detector share 1/7 -> left alone, however active 0 and 1 are
    out = hook(h)
    assert torch.equal(out[0], torch.tensor([[0.0, 0.0, 3.0, 0.0]]))
    assert torch.equal(out[1], h[1])
    with pytest.raises(ErasekitError, match="does not have"):
        build_itd_hook({**tensors, "detect": torch.tensor([9])}, {"k": 4, "scale": 0.0, "threshold": 0.5, "selective": True}, 4)


def test_the_hook_refuses_an_sae_of_another_width_and_features_it_does_not_have() -> None:
    with pytest.raises(ErasekitError, match="trained on another model"):
        build_itd_hook({**identity_sae(4), "features": torch.tensor([0])}, {"k": 4, "scale": 0.0, "threshold": 0.5, "selective": True}, 8)
    with pytest.raises(ErasekitError, match="does not have"):
        build_itd_hook({**identity_sae(4), "features": torch.tensor([7])}, {"k": 4, "scale": 0.0, "threshold": 0.5, "selective": True}, 4)


def test_the_sae_learns_a_sparse_dictionary_and_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(32, 16, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    codes = torch.zeros(4096, 32)
    picks = torch.randint(32, (4096, 2), generator=gen)
    codes.scatter_(1, picks, torch.rand(4096, 2, generator=gen) + 0.5)
    rows = codes @ atoms
    a = train_sae(rows, 64, 4, 400, 3e-3, 256, seed=0)
    b = train_sae(rows, 64, 4, 400, 3e-3, 256, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    stats = a.stats(rows)
    assert stats.unexplained < 0.2, stats
    assert int((a.activations(rows) > 0).sum(1).max()) <= 4


def test_calibration_separates_two_groups_and_the_mask_starts_at_the_concept_word() -> None:
    assert 0.3 < calibrate(torch.tensor([0.6, 0.8, 0.9]), torch.tensor([0.0, 0.1, 0.3])) < 0.6
    pipe = tiny_pipeline()
    ids = pipe.tokenizer(["a red circle", "a ring"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    mask = concept_mask(pipe, ["a red circle", "a ring"], ids, ["circle"])
    assert mask[0].tolist() == [False] * 3 + [True] * 74 and not mask[1].any()


def test_itd_on_a_tiny_model_changes_only_prompts_that_carry_the_concept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache" / "generations"))
    pipe = tiny_pipeline()
    before = {p: encoded(pipe, p) for p in ("an image of a circle", "")}
    result = erasekit.erase(pipe, "circle", method="itd", budget="tiny", sae_steps=60, threshold=0.0)
    assert result.kind == "hook" and result.hook["type"] == "itd" and result.config["corpus"] == "toy"
    assert list((tmp_path / "cache" / "sae").glob("*.safetensors")), "the SAE is cached for the next concept"
    saved = result.save(tmp_path / "itd")
    loaded = erasekit.load(tiny_pipeline(), saved)
    assert not torch.equal(encoded(loaded, "an image of a circle"), before["an image of a circle"])
    erasekit.remove(loaded)
    assert torch.equal(encoded(loaded, "an image of a circle"), before["an image of a circle"])
    flags = classify(pipe, result, ["an image of a circle", ""])
    assert flags[0][2] and flags[0][1] > flags[1][1]


def test_itd_refuses_a_layer_out_of_range_and_an_empty_corpus(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    assert layer_index(pipe, -1) in range(len(encoder_layers(pipe.text_encoder)))
    with pytest.raises(ErasekitError, match="layer is 9"):
        erasekit.erase(pipe, "circle", method="itd", budget="tiny", layer=9)
    empty = tmp_path / "corpus.txt"
    empty.write_text("\n\n")
    with pytest.raises(ErasekitError, match="corpus"):
        erasekit.erase(pipe, "circle", method="itd", budget="tiny", corpus=str(empty))


def encoded(pipe, prompt: str) -> torch.Tensor:
    """The text encoder's last hidden state for one prompt."""
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_a_saved_sae_round_trips() -> None:
    sae = TopKSAE(8, 16, 3)
    sae.init_from(torch.randn(10, 8), torch.Generator().manual_seed(0))
    again = sae_from_tensors(sae_tensors(sae), 3, 8)
    x = torch.randn(5, 8)
    assert torch.equal(sae(x), again(x))
