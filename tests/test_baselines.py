"""The baselines behind the common interface: UCE, RECE, CA and AGE do what their papers' code does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import erasekit
from conftest import tiny_pipeline
from erasekit.concepts import encode
from erasekit.errors import ErasekitError
from erasekit.methods import get_method
from erasekit.methods.age import AdaptiveAnchor, AGEConfig
from erasekit.methods.closed_form import derive_embedding, edit_rows, encoder_rows, last_token_index, uce_edit, weights_of
from erasekit.methods.eap import GumbelSearch

KV = (".attn2.to_k.weight", ".attn2.to_v.weight")
SMALL = {
    "uce": {},
    "rece": {},
    "ca": {"iterations": 3, "ddim_steps": 3, "lr": 1e-3, "anchor_images": 8},
    "age": {"iterations": 3, "ddim_steps": 3, "lr": 1e-3, "k": 8, "n_centres": 3},
}


def _rows(pipe, text: str) -> torch.Tensor:
    """The last word token's row of ``text`` (float64)."""
    return encoder_rows(pipe, [text])[0, last_token_index(pipe, text)]


def _matrices(result) -> dict[str, torch.Tensor]:
    return {k.removeprefix("unet."): v.double() for k, v in result.delta.items()}


def test_last_token_index_picks_the_last_sub_token(tiny) -> None:
    assert last_token_index(tiny, "") == 0  # the start token: UCE's row for the guide ''
    assert last_token_index(tiny, "circle") == 1
    n_tokens = len(tiny.tokenizer("honeycomb cell").input_ids) - 2
    assert last_token_index(tiny, "honeycomb cell") == n_tokens >= 2


def test_uce_maps_the_target_key_to_the_guide_value(tiny) -> None:
    w0 = weights_of(tiny.unet)
    result = erasekit.erase(tiny, "circle", method="uce", lam=1e-4, preserve_scale=0.0)
    c_e, c_guide = _rows(tiny, "circle"), _rows(tiny, "")
    for name, w_new in _matrices(result).items():
        assert torch.allclose(w_new @ c_e, w0[name] @ c_guide, atol=1e-3), name
        assert not torch.allclose(w0[name] @ c_e, w0[name] @ c_guide, atol=1e-2)


def test_uce_keeps_preserved_outputs(tiny) -> None:
    w0 = weights_of(tiny.unet)
    c_p = [_rows(tiny, p) for p in ("ring", "star")]
    exact = _matrices(erasekit.erase(tiny, "circle", method="uce", preserve=["ring", "star"], lam=1e-4))
    for name, w_new in exact.items():
        assert all(torch.allclose(w_new @ c, w0[name] @ c, atol=1e-3) for c in c_p), name
    # at the default lambda the preserve terms still pull the neighbours' outputs back toward the original
    kept = _matrices(erasekit.erase(tiny, "circle", method="uce", preserve=["ring", "star"]))
    free = _matrices(erasekit.erase(tiny, "circle", method="uce"))
    drift = lambda ws: sum(float((ws[n] @ c - w0[n] @ c).norm()) for n in ws for c in c_p)  # noqa: E731
    assert drift(kept) < 0.5 * drift(free)


def test_uce_changes_only_cross_attention_keys_and_values(tiny) -> None:
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    result = erasekit.erase(tiny, ["circle", "round disk"], method="uce", expand_prompts=True)
    assert all(torch.equal(before[k], v) for k, v in tiny.unet.state_dict().items()), "the pipeline must be left unchanged"
    n_kv = sum(1 for k in before if k.endswith(KV))
    assert len(result.delta) == n_kv and all(k.endswith(KV) for k in result.delta)
    assert result.kind == "weights" and result.base_hash and result.history[0]["erase_rows"] == 12
    values_only = erasekit.erase(tiny, "circle", method="uce", edit_keys=False)
    assert values_only.delta and all(k.endswith(".attn2.to_v.weight") for k in values_only.delta)


def test_uce_old_and_new_key_rows_differ_and_old_code_retains_empty(tiny) -> None:
    new = erasekit.erase(tiny, "circle", method="uce")
    old = erasekit.erase(tiny, "circle", method="uce", budget="old-code")
    assert old.history[0]["preserve_rows"] == 77 and old.history[0]["preserve_scale"] == 1.0
    assert old.history[0]["erase_rows"] == 77 - 1  # "circle" ends at row 1, the guide '' at row 0
    assert any(not torch.allclose(new.delta[k], old.delta[k]) for k in new.delta)


def _rece_by_hand(pipe, reg: float, lam: float, s_p: float, start_lam: float = 0.5, start_s_p: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """RECE's first round from explicit inverses: c' = (reg I + sum W'ᵀW')⁻¹ (sum W'ᵀW0) c, then UCE on W'.

    W' is the UCE edit RECE starts from, made with UCE's own defaults (lambda 0.5, preserve 1.0), not the rounds'.
    """
    w0 = weights_of(pipe.unet)
    start = uce_edit(w0, edit_rows(pipe, ["circle"], [""], [""], "through-eos"), start_lam, 1.0, start_s_p)
    c = encoder_rows(pipe, ["circle"])[0]
    d = c.shape[1]
    lhs = reg * torch.eye(d, dtype=torch.float64) + sum(w.T @ w for w in start.values())
    rhs = sum(start[n].T @ w0[n] for n in start)
    c_adv = (torch.linalg.inv(lhs) @ rhs @ c.T).T
    guide, retained = encoder_rows(pipe, [""])[0], encoder_rows(pipe, [""])[0]
    gram = lam * torch.eye(d, dtype=torch.float64) + c_adv.T @ c_adv + s_p * retained.T @ retained
    out = {n: (lam * w + w @ guide.T @ c_adv + s_p * w @ retained.T @ retained) @ torch.linalg.inv(gram) for n, w in start.items()}
    return out, c_adv


def test_rece_erases_the_derived_embedding_beyond_uce(tiny) -> None:
    rece = erasekit.erase(tiny, "circle", method="rece")
    uce = erasekit.erase(tiny, "circle", method="uce", key_rows="through-eos", retain_empty=True)  # UCE's defaults: lambda 0.5, s_p 1
    assert rece.delta.keys() == uce.delta.keys()
    assert any(not torch.allclose(rece.delta[k], uce.delta[k], atol=1e-6) for k in rece.delta), "RECE must change weights beyond UCE"
    expected, c_adv = _rece_by_hand(tiny, reg=1e-3, lam=0.1, s_p=0.1)
    for name, w in _matrices(rece).items():
        assert torch.allclose(w, expected[name], rtol=1e-4, atol=1e-5), name
    # the derived embedding solves its normal equations: it still regenerates the concept under W'
    start = uce_edit(weights_of(tiny.unet), edit_rows(tiny, ["circle"], [""], [""], "through-eos"), 0.5, 1.0, 1.0)
    c = encoder_rows(tiny, ["circle"])[0]
    derived = derive_embedding(start, weights_of(tiny.unet), c, 1e-3)
    assert torch.allclose(derived, c_adv, atol=1e-8)
    assert rece.history[1]["embedding_shift"] > 0


def test_rece_starts_from_uce_made_with_uce_defaults_not_the_rounds_settings(tiny) -> None:
    from erasekit.methods.rece import RECEConfig, rece_start

    rows = edit_rows(tiny, ["circle"], [""], [""], "through-eos")
    w0 = weights_of(tiny.unet)
    uce_defaults = uce_edit(w0, rows, 0.5, 1.0, 1.0)
    start = rece_start(w0, rows, RECEConfig(), n_retain=1)  # rounds' lambda/preserve stay 0.1
    assert all(torch.equal(start[n], uce_defaults[n]) for n in start)
    rounds_settings = uce_edit(w0, rows, 0.1, 1.0, 0.1)
    assert any(not torch.allclose(start[n], rounds_settings[n], atol=1e-6) for n in start)
    art = rece_start(w0, rows, get_method("rece").config_class(**get_method("rece").presets["art"]), n_retain=1)
    assert all(torch.equal(art[n], uce_edit(w0, rows, 0.5, 1.0, 0.1)[n]) for n in art)
    # the whole method: changing the start's settings changes the result, the rounds' settings stay apart
    a = erasekit.erase(tiny, "circle", method="rece")
    b = erasekit.erase(tiny, "circle", method="rece", start_lam=0.1, start_preserve_scale=0.1)
    assert any(not torch.allclose(a.delta[k], b.delta[k], atol=1e-6) for k in a.delta)


def test_rece_round_selector_picks_the_lowest_score(tiny) -> None:
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    kv = next(k for k in before if k.endswith(KV))
    seen: list[torch.Tensor] = []

    def score(pipe, round_: int) -> float:
        seen.append(pipe.unet.state_dict()[kv].clone())  # the selector sees that round's weights applied
        return {1: 5.0, 2: 1.0, 3: 3.0}[round_]

    chosen = erasekit.erase(tiny, "circle", method="rece", rounds=3, round_selector=score)
    assert chosen.history[-1]["chosen_round"] == 2 and len(seen) == 3
    assert torch.equal(seen[1], chosen.delta[f"unet.{kv}"]) and not torch.equal(seen[0], before[kv])
    assert all(torch.equal(before[k], v) for k, v in tiny.unet.state_dict().items())
    two = erasekit.erase(tiny, "circle", method="rece", rounds=2)
    assert all(torch.equal(chosen.delta[k], two.delta[k]) for k in two.delta)


def _ca_gap(pipe, x: torch.Tensor, t: torch.Tensor) -> float:
    """|eps(x, target prompt) - eps(x, anchor prompt)|: what CA's model-based loss trains toward zero."""
    with torch.no_grad():
        target = pipe.unet(x, t, encoder_hidden_states=encode(pipe, ["a photo of a circle"] * len(x))).sample
        anchor = pipe.unet(x, t, encoder_hidden_states=encode(pipe, ["a photo of a ring"] * len(x))).sample
    return float((target - anchor).norm())


def test_ca_pulls_the_target_prediction_onto_the_anchor(tiny) -> None:
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 300, 500, 700])
    gap_before = _ca_gap(tiny, x, t)
    result = erasekit.erase(tiny, "circle", method="ca", anchor="ring", iterations=40, lr=5e-3, ddim_steps=3, anchor_images=16)
    assert all(k.endswith(KV) for k in result.delta)
    result.apply(tiny)
    assert _ca_gap(tiny, x, t) < 0.7 * gap_before
    steps = [h for h in result.history if "step" in h]
    assert len(steps) == 40 and result.history[0]["anchor"] == "ring"


def test_ca_variants_train_their_declared_parameters(tiny) -> None:
    wide = erasekit.erase(tiny, "circle", method="ca", kv_only=False, loss="noise-based", prior_preservation=True, **SMALL["ca"])
    assert any(".attn2.to_q." in k for k in wide.delta) and all(".attn2." in k for k in wide.delta)
    assert all(h["preserve_loss"] > 0 for h in wide.history if "step" in h), "prior preservation adds a preserve loss"


def test_ca_prompts_come_from_templates(tiny, tmp_path: Path) -> None:
    default = erasekit.erase(tiny, "circle", method="ca", **SMALL["ca"])
    assert default.history[0]["anchor_prompts"] == [""], "the default anchor is the empty prompt"
    styles = tmp_path / "styles.txt"
    styles.write_text("painting in the style of {concept}\n{article} {concept} drawing\n")
    styled = erasekit.erase(tiny, "circle", method="ca", anchor="ring", templates=str(styles), **SMALL["ca"])
    assert styled.history[0]["anchor_prompts"] == ["a ring drawing", "painting in the style of ring"]
    styles.write_text("painting of {}\n")
    with pytest.raises(ErasekitError, match="concept"):
        erasekit.erase(tiny, "circle", method="ca", templates=str(styles), **SMALL["ca"])


def test_age_anchor_mixture_is_one_hot_or_top_k(tiny, words_file: Path) -> None:
    config = AGEConfig(concept_space=str(words_file), k=8, n_centres=4)
    search = GumbelSearch(tiny, ["circle"], config)
    noise = torch.zeros(len(search.candidates[0]))
    hard = AdaptiveAnchor(search, config).weights(0, noise)
    assert sorted(hard.detach().tolist())[-1] == 1.0 and int((hard.detach() != 0).sum()) == 1
    hard.sum().backward()  # the straight-through sample carries a gradient to the logits
    assert search.logits[0].grad is not None
    soft = AdaptiveAnchor(search, AGEConfig(concept_space=str(words_file), k=8, n_centres=4, gumbel_hard=False, gumbel_topk=2))
    w = soft.weights(0, torch.linspace(0, 1, len(search.candidates[0])))
    assert int((w.detach() > 0).sum()) == 2 and torch.isclose(w.sum(), torch.tensor(1.0))


def test_age_moves_its_logits_and_records_its_anchors(tiny, words_file: Path) -> None:
    result = erasekit.erase(tiny, "circle", method="age", concept_space=str(words_file), k=8, n_centres=3,
                            iterations=4, ddim_steps=3, lr=1e-3, gumbel_lr=0.5, gumbel_temperature=2.0)
    steps = [h for h in result.history if "step" in h]
    probs = [h["search"] for h in result.history if "search" in h][0]["probabilities"][0]
    assert len(steps) == 4 and all(h["anchor"] in probs for h in steps)
    assert "circle" not in probs
    assert max(probs.values()) - min(probs.values()) > 1e-3
    assert all(".attn2." in k for k in result.delta)


def test_age_faithful_path_alternates_and_is_deterministic(words_file: Path) -> None:
    kwargs = dict(method="age", concept_space=str(words_file), k=8, n_centres=3, iterations=2, ddim_steps=3, lr=1e-3, faithful=True)
    first = erasekit.erase(tiny_pipeline(), "circle", **kwargs)
    second = erasekit.erase(tiny_pipeline(), "circle", **kwargs)
    assert len([h for h in first.history if "step" in h]) == 2
    assert all(torch.equal(first.delta[k], second.delta[k]) for k in first.delta)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_baseline_is_deterministic(name: str, words_file: Path) -> None:
    extra = {"concept_space": str(words_file)} if name == "age" else {}
    first = erasekit.erase(tiny_pipeline(), "circle", method=name, **SMALL[name], **extra)
    second = erasekit.erase(tiny_pipeline(), "circle", method=name, **SMALL[name], **extra)
    assert first.delta.keys() == second.delta.keys()
    assert all(torch.equal(first.delta[k], second.delta[k]) for k in first.delta)


@pytest.mark.parametrize(
    "method, kwargs, message",
    [
        ("uce", {"train_method": "full"}, "cannot edit"),
        ("rece", {"train_method": "noxattn"}, "cannot edit"),
        ("uce", {"guide": "circle"}, "guide"),
        ("uce", {"preserve": ["circle"]}, "both erased and preserved"),
        ("uce", {"key_rows": "all"}, "key_rows"),
        ("rece", {"rounds": 0}, "rounds"),
        ("ca", {"anchor": "Circle"}, "anchor"),
        ("ca", {"train_method": "lora"}, "train_method"),
        ("ca", {"train_method": "selfattn"}, "kv_only"),
        ("ca", {"loss": "other"}, "loss"),
        ("age", {"gumbel_topk": 0}, "gumbel_topk"),
    ],
)
def test_bad_baseline_requests_raise_one_line_errors(tiny, method: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ErasekitError, match=message) as info:
        erasekit.erase(tiny, "circle", method=method, **kwargs)
    assert "\n" not in str(info.value)


def test_empty_preserve_sets_are_refused(tiny, tmp_path: Path) -> None:
    only_target = tmp_path / "only.txt"
    only_target.write_text("circle\n")
    with pytest.raises(ErasekitError, match="empty") as info:
        erasekit.erase(tiny, "circle", method="uce", preserve_file=str(only_target))
    assert "\n" not in str(info.value)
    with pytest.raises(ErasekitError, match="no usable concepts"):
        erasekit.erase(tiny, "circle", method="age", concept_space=str(only_target), k=1, n_centres=1, iterations=1, ddim_steps=2)
