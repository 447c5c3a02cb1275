"""Where erasekit once drifted from the reference code, pinned: EAP's search start, its candidates, UCE's templated guides,
and the paper's ablation of which concept is preserved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import erasekit
from conftest import tiny_pipeline
from erasekit.concepts import select_candidates
from erasekit.errors import ErasekitError
from erasekit.methods import get_method, make_config
from erasekit.methods.base import ErasureRequest
from erasekit.methods.eap import GumbelSearch


def _fast_eap(words_file: Path, iterations: int) -> tuple[GumbelSearch, list[torch.Tensor], list[torch.Tensor]]:
    from erasekit.methods import loop

    pipe = tiny_pipeline()
    config = make_config(get_method("eap"), None, iterations=iterations, ddim_steps=3, lr=0.1, k=8, n_centres=3, gumbel_lr=0.05,
                         concept_space=str(words_file))
    search = GumbelSearch(pipe, ["circle"], config)
    seen = [search.logits[0].detach().clone()]
    grads: list[torch.Tensor] = []
    search.logits[0].register_hook(lambda g: grads.append(g.clone()))
    s = loop.prepare(pipe, ErasureRequest(("circle",)), config)
    try:
        loop.fast_loop(s, "x0", search, 1, lambda step, total, record: seen.append(search.logits[0].detach().clone()))
    finally:
        s.trainable.restore()
    return search, seen, grads


def test_the_search_takes_no_step_on_the_zero_loss_before_the_first_model_update(words_file: Path) -> None:
    search, seen, grads = _fast_eap(words_file, 2)
    state = search.optimizer.state[search.logits[0]]
    assert int(state["step"]) == 1  # step 1 (theta == theta0, preserve_loss == 0) took none, step 2 took one
    assert torch.equal(seen[1], seen[0]) and not grads[0].any()
    # Adam's first real step ascends by lr * g / (|g| + eps); after a wasted step it would move at about 0.74 of that
    g = grads[-1]
    assert g.abs().max() > 0
    assert torch.allclose(seen[2] - seen[1], 0.05 * g / (g.abs() + 1e-8), rtol=1e-4, atol=1e-7)


def test_candidates_match_the_references_kmeans_as_scikit_learn_runs_it_today() -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    words = [f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(300)]
    dist = torch.tensor(rng.gamma(2.0, 1.0, size=300))
    near = np.sort(dist.numpy())[:200].reshape(-1, 1)

    def by_hand(km: KMeans) -> list[str]:
        picked = []
        for centre in np.sort(km.fit(near).cluster_centers_[:, 0]):
            j = int(np.argmin(np.abs(near[:, 0] - centre)))
            if j not in picked:
                picked.append(j)
        order = np.argsort(dist.numpy(), kind="stable")
        return [words[int(order[j])] for j in picked]

    reference = by_hand(KMeans(n_clusters=40, random_state=0))  # train_adversarial_gumbel.py's call, default n_init
    ten = by_hand(KMeans(n_clusters=40, random_state=0, n_init=10))
    assert reference != ten  # the case tells the two apart
    assert select_candidates(dist, words, 200, 40, set()) == reference
    assert select_candidates(dist, words, 200, 40, set(), n_init=10) == ten
    assert make_config(get_method("eap")).kmeans_n_init == 1


def test_uce_expanded_prompts_are_guided_to_the_same_template_of_the_guide() -> None:
    from erasekit.methods.closed_form import OBJECT_TEMPLATES
    from erasekit.methods.uce import resolve_prompts

    pipe = tiny_pipeline()
    config = make_config(get_method("uce"), None, expand_prompts=True, guide="ring")
    prompts = resolve_prompts(pipe, ErasureRequest(("circle",)), config)
    assert prompts.erase == ["circle", *(t.format("circle") for t in OBJECT_TEMPLATES)]
    assert prompts.guides == ["ring", *(t.format("ring") for t in OBJECT_TEMPLATES)]


def _eap(words_file: Path, choice: str, **extra: object) -> erasekit.ErasureResult:
    settings = {"iterations": 6, "ddim_steps": 3, "lr": 1e-3, "k": 8, "n_centres": 4, "concept_space": str(words_file), **extra}
    return erasekit.erase(tiny_pipeline(), "circle", method="eap", preserve_choice=choice, **settings)


def test_preserve_choice_nearest_keeps_the_closest_candidate_every_step(words_file: Path) -> None:
    result = _eap(words_file, "nearest")
    steps = [h for h in result.history if "step" in h]
    summary = result.history[-1]["search"]
    assert {h["adversarial"] for h in steps} == {summary["nearest"][0]}
    assert summary["nearest"][0] in summary["candidates"][0]
    from erasekit.concepts import concept_space, distances, encode

    pipe = tiny_pipeline()
    words = list(concept_space(str(words_file)).words)
    d = distances(pipe, encode(pipe, ["circle"])[0], words)
    closest = min(summary["candidates"][0], key=lambda w: float(d[words.index(w)]))
    assert summary["nearest"][0] == closest


def test_preserve_choice_random_draws_uniformly_from_the_same_candidates(words_file: Path) -> None:
    result = _eap(words_file, "random", iterations=12)
    steps = [h for h in result.history if "step" in h]
    candidates = result.history[-1]["search"]["candidates"][0]
    drawn = [h["adversarial"] for h in steps]
    assert set(drawn) <= set(candidates) and len(set(drawn)) > 1
    adversarial = _eap(words_file, "adversarial")
    assert adversarial.history[-1]["search"]["probabilities"][0].keys() == set(candidates)  # the same candidate set


def test_preserve_choice_none_is_esd_in_x0_space(words_file: Path) -> None:
    none = _eap(words_file, "none")
    assert all("adversarial" not in h for h in none.history) and all(h.get("preserve_loss", 0.0) == 0.0 for h in none.history)
    adversarial = _eap(words_file, "adversarial")
    assert any(not torch.equal(none.delta[k], adversarial.delta[k]) for k in none.delta)


def test_bad_preserve_choices_are_one_line_errors(words_file: Path) -> None:
    with pytest.raises(ErasekitError, match="unknown preserve_choice 'closest'; choose one of: adversarial, random, nearest, none"):
        make_config(get_method("eap"), None, preserve_choice="closest")
    for method in ("eap-pgd", "age"):
        with pytest.raises(ErasekitError, match="preserve_choice applies to eap"):
            make_config(get_method(method), None, preserve_choice="random")
    with pytest.raises(ErasekitError, match="kmeans_n_init must be >= 1"):
        make_config(get_method("eap"), None, kmeans_n_init=0)
