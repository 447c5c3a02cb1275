"""One table over every registered diffusion method (Janus methods: test_janus_methods.py), plus the behaviours ESD and EAP promise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import erasekit
from conftest import DIFFUSION_METHODS, tiny_pipeline
from erasekit.concepts import encode, encode_cond
from erasekit.errors import ErasekitError
from erasekit.families import Cond
from erasekit.methods import get_method
from erasekit.methods.base import TrainableUNet, esd_target
from erasekit.methods.eap import GumbelSearch
from erasekit.models import select_parameters
from erasekit.sampling import generate

FAST = {"iterations": 3, "ddim_steps": 3, "lr": 1e-3}


def concept_for(name: str) -> str:
    """The concept each method erases here: geom-erasing removes an implicit one (its tiny preset trains on toy renders with the skull)."""
    return "skull" if name == "geom-erasing" else "circle"


def settings_for(name: str, words: Path) -> dict:
    """Small settings every method accepts."""
    if name == "co-erasing":  # the tiny preset, and an image adapter for the tiny model (stage 2 prompts with images)
        from conftest import tiny_adapter_dir

        return {"budget": "tiny", "adapter": tiny_adapter_dir()}
    if get_method(name).kind in ("inference-time", "text-encoder") or name in ("mace", "geom-erasing", "doco", "trce"):  # the tiny preset sizes the SAE, the text-encoder run, MACE's images, DoCo's warm-up, TRCE's trajectories
        return {"budget": "tiny"}
    fields = {f.name for f in dataclasses.fields(get_method(name).config_class)}
    extra = {"concept_space": str(words), "k": 8, "n_centres": 3} if "k" in fields else {}
    return {**{k: v for k, v in FAST.items() if k in fields}, **extra}


def _unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize("name", DIFFUSION_METHODS)
def test_method_changes_only_its_parameters_and_leaves_pipeline_unchanged(name: str, tiny, words_file: Path) -> None:
    before = _unet_state(tiny)
    result = erasekit.erase(tiny, concept_for(name), method=name, **settings_for(name, words_file))
    after_fit = _unet_state(tiny)
    assert all(torch.equal(before[k], after_fit[k]) for k in before), "erase() must leave the pipeline as it was"
    assert result.delta and result.base_hash and result.method == name
    if get_method(name).kind == "inference-time":  # a hook on the text encoder: no weight of either network changes
        text_before = {k: v.clone() for k, v in tiny.text_encoder.state_dict().items()}
        result.apply(tiny)
        assert result.kind == "hook" and all(torch.equal(v, before[k]) for k, v in _unet_state(tiny).items())
        assert all(torch.equal(v, text_before[k]) for k, v in tiny.text_encoder.state_dict().items())
        return
    if get_method(name).kind == "text-encoder":  # the text encoder's chosen layers change, the denoiser never
        from erasekit.methods.te_model import te_parameters

        text_before = {k: v.detach().clone() for k, v in tiny.text_encoder.named_parameters()}
        config = erasekit.methods.make_config(get_method(name), "tiny")
        result.apply(tiny)
        assert all(torch.equal(v, before[k]) for k, v in _unet_state(tiny).items())
        moved = {k for k, v in tiny.text_encoder.named_parameters() if not torch.equal(v, text_before[k])}
        assert moved and moved <= set(te_parameters(tiny.text_encoder, config.te_layers))
        return
    result.apply(tiny)
    applied = _unet_state(tiny)
    changed = {k for k in before if not torch.equal(before[k], applied[k])}
    allowed = set(select_parameters(tiny.unet, get_method(name).config_class().train_method))
    assert changed, "the erasure changed nothing"
    assert changed <= allowed, f"changed parameters outside the declared set: {sorted(changed - allowed)[:3]}"


@pytest.mark.parametrize("name", DIFFUSION_METHODS)
def test_method_is_deterministic(name: str, words_file: Path) -> None:
    first = erasekit.erase(tiny_pipeline(), concept_for(name), method=name, **settings_for(name, words_file))
    second = erasekit.erase(tiny_pipeline(), concept_for(name), method=name, **settings_for(name, words_file))
    assert first.delta.keys() == second.delta.keys()
    assert all(torch.equal(first.delta[k], second.delta[k]) for k in first.delta)


def _esd_gap(pipe, concept: str, x: torch.Tensor, t: torch.Tensor) -> float:
    """|eps_theta(x, c) - ESD target| on fixed inputs: what ESD trains to zero."""
    with torch.no_grad():
        emb_c, emb_0 = encode(pipe, [concept] * len(x)), encode(pipe, [""] * len(x))
        e_c = pipe.unet(x, t, encoder_hidden_states=emb_c).sample
        e_0 = pipe.unet(x, t, encoder_hidden_states=emb_0).sample
        return float((e_c - esd_target(e_0, e_c, 1.0)).norm())


def test_esd_shrinks_the_negative_guidance_gap(tiny) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([100, 300, 500, 700])
    base = tiny_pipeline()
    gap_before = _esd_gap(base, "circle", x, t)
    result = erasekit.erase(tiny, "circle", method="esd-x", iterations=40, ddim_steps=3, lr=3e-3)
    result.apply(base)
    # the trained model moves toward the frozen model's negatively guided target, not away
    with torch.no_grad():
        emb_c, emb_0 = encode(base, ["circle"] * len(x)), encode(base, [""] * len(x))
        ref = tiny_pipeline()
        e0_c = ref.unet(x, t, encoder_hidden_states=emb_c).sample
        e0_0 = ref.unet(x, t, encoder_hidden_states=emb_0).sample
        target = esd_target(e0_0, e0_c, 1.0)
        after = float((base.unet(x, t, encoder_hidden_states=emb_c).sample - target).norm())
    assert after < 0.8 * gap_before, (after, gap_before)


def test_gumbel_search_moves_toward_the_most_damaging_candidate(tiny, words_file: Path) -> None:
    from erasekit.methods.eap import EAPConfig

    config = EAPConfig(concept_space=str(words_file), k=8, n_centres=4, gumbel_lr=0.1)
    search = GumbelSearch(tiny, ["circle"], config)
    n = len(search.candidates[0])
    # a stand-in preservation loss whose value is known for every candidate: the search must climb it
    damage = torch.linspace(0.0, 1.0, n)
    bank = search.embeddings[0].parts["hidden"]
    probe = torch.randn(bank.shape[1:])
    per_candidate = (bank * probe).sum(dim=(1, 2))
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        draw = search.draw(0, gen)
        emb = draw.embedding().parts["hidden"]
        loss = (emb * probe).sum() / per_candidate[draw.index] * damage[draw.index]
        loss.backward()
        search.ascend(0)
    probs = torch.softmax(search.logits[0].detach(), 0)
    assert int(torch.argmax(probs)) == n - 1
    assert float(probs[-1]) > 2.0 / n


def test_eap_search_leaves_uniform_and_records_history(tiny, words_file: Path) -> None:
    result = erasekit.erase(tiny, "circle", method="eap", concept_space=str(words_file), k=8, n_centres=3,
                            iterations=6, ddim_steps=3, lr=1e-3, gumbel_lr=0.5)
    steps = [h for h in result.history if "step" in h]
    assert len(steps) == 6 and all(h["adversarial"] and h["most_sensitive"] for h in steps)
    probs = [h["search"] for h in result.history if "search" in h][0]["probabilities"][0]
    assert "circle" not in probs, "the target must never be its own preserved candidate"
    assert max(probs.values()) - min(probs.values()) > 1e-3


def test_lora_frozen_switch_reproduces_the_base_model(tiny) -> None:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    emb = encode(tiny, ["a circle", "a star"])
    with torch.no_grad():
        base = tiny.unet(x, t, encoder_hidden_states=emb).sample
    trainable = TrainableUNet(tiny, "lora", 2)
    with torch.no_grad():
        for p in trainable.params.values():
            p.add_(0.5)
        live = trainable.eps(x, t, Cond({"hidden": emb}))
    frozen = trainable.frozen_eps(x, t, Cond({"hidden": emb}))
    assert not torch.allclose(live, base)
    assert torch.allclose(frozen, base, atol=1e-6)
    trainable.restore()


def test_full_parameter_frozen_switch_reproduces_the_base_model(tiny) -> None:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    emb = encode(tiny, ["a circle", "a star"])
    with torch.no_grad():
        base = tiny.unet(x, t, encoder_hidden_states=emb).sample
    trainable = TrainableUNet(tiny, "xattn", 0)
    with torch.no_grad():
        for p in trainable.params.values():
            p.add_(0.1)
    assert torch.equal(trainable.frozen_eps(x, t, Cond({"hidden": emb})), base)
    trainable.restore()
    with torch.no_grad():
        assert torch.equal(tiny.unet(x, t, encoder_hidden_states=emb).sample, base)


def test_multi_concept_and_explicit_preserve(tiny, words_file: Path) -> None:
    result = erasekit.erase(tiny, ["circle", "star"], method="eap", preserve=["ring"], concept_space=str(words_file),
                            k=8, n_centres=3, iterations=4, ddim_steps=3)
    steps = [h for h in result.history if "step" in h]
    assert {h["target"] for h in steps} <= {"circle", "star"}
    assert all(h["preserve_loss"] >= 0 for h in steps)
    assert result.concepts == ("circle", "star") and result.preserve == ("ring",)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"concepts": "   "}, "empty concept"),
        ({"concepts": "word " * 80}, "tokens long"),
        ({"method": "nope"}, "unknown method"),
        ({"k": 500}, "K=500"),
        ({"iterations": 0}, "iterations"),
        ({"train_method": "bogus"}, "train_method"),
    ],
)
def test_bad_erase_requests_raise_one_line_errors(tiny, words_file: Path, kwargs: dict, message: str) -> None:
    args = {"concepts": "circle", "method": "eap", "concept_space": str(words_file), "k": 8, "n_centres": 3, "iterations": 2, "ddim_steps": 2}
    args.update(kwargs)
    if args["method"] == "nope":
        args = {"concepts": "circle", "method": "nope"}
    with pytest.raises(ErasekitError, match=message) as info:
        erasekit.erase(tiny, **args)
    assert "\n" not in str(info.value)


def test_generate_is_deterministic_per_seed_and_batch_independent(tiny) -> None:
    a = generate(tiny, ["a circle", "a star", "a moon"], [1, 2, 3], steps=3, batch_size=3)
    b = generate(tiny, ["a circle", "a star", "a moon"], [1, 2, 3], steps=3, batch_size=1)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    c = generate(tiny, ["a circle"], [1], steps=3)
    assert np.array_equal(a[:1], c)


def test_fast_and_faithful_paths_compute_the_same_losses(words_file: Path) -> None:
    from erasekit.methods.loop import erasure_losses

    pipe = tiny_pipeline()
    fast = TrainableUNet(pipe, "xattn", 0)
    with torch.no_grad():
        for p in fast.params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    faithful = TrainableUNet(tiny_pipeline(), "xattn", 0, separate_copy=True)
    with torch.no_grad():
        for name, p in faithful.params.items():
            p.copy_(fast.params[name])
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(2, 4, 8, 8, generator=g)
    conds = encode_cond(pipe, ["circle", "ring"])
    null = encode_cond(pipe, [""])
    t = torch.full((3,), 400)
    alpha = pipe.scheduler.alphas_cumprod[400]
    to_x0 = lambda x, e: (x - (1 - alpha).sqrt() * e) / alpha.sqrt()  # noqa: E731  (the eps x0 map)
    # fast: one batched frozen forward and one batched trainable forward
    frozen_b = fast.frozen_eps(torch.cat([xs[:1], xs]), t, Cond.cat([null, conds]))
    pred_b = fast.eps(xs, t[:2], conds)
    # faithful: one forward per term, frozen from the separate copy
    one = t[:1]
    frozen_s = torch.cat([faithful.frozen_eps(xs[:1], one, null), faithful.frozen_eps(xs[:1], one, conds[:1]), faithful.frozen_eps(xs[1:], one, conds[1:])])
    pred_s = torch.cat([faithful.eps(xs[:1], one, conds[:1]), faithful.eps(xs[1:], one, conds[1:])])
    for space in ("x0", "eps"):
        a = erasure_losses(pred_b, frozen_b, xs, to_x0, 1.0, space)
        b = erasure_losses(pred_s, frozen_s, xs, to_x0, 1.0, space)
        assert torch.allclose(a[0], b[0], rtol=1e-4, atol=1e-7) and torch.allclose(a[1], b[1], rtol=1e-4, atol=1e-7)
        assert a[0] > 0 and a[1] > 0


@pytest.mark.parametrize("faithful, reuse, share", [(True, 1, 1), (False, 3, 1), (False, 1, 3)])
def test_eap_paths_are_deterministic_and_change_only_cross_attention(faithful: bool, reuse: int, share: int, words_file: Path) -> None:
    kwargs = dict(method="eap", concept_space=str(words_file), k=8, n_centres=3, iterations=4, ddim_steps=3, lr=1e-3,
                  faithful=faithful, rollout_reuse=reuse, rollout_share=share)
    first = erasekit.erase(tiny_pipeline(), "circle", **kwargs)
    second = erasekit.erase(tiny_pipeline(), "circle", **kwargs)
    assert all(torch.equal(first.delta[k], second.delta[k]) for k in first.delta)
    assert all(".attn2." in k for k in first.delta)
    assert len([h for h in first.history if "step" in h]) == 4


@pytest.mark.parametrize("name", DIFFUSION_METHODS)
def test_release_unused_gives_the_same_delta_and_frees_the_text_encoder(name: str, words_file: Path) -> None:
    kept = erasekit.erase(tiny_pipeline(), concept_for(name), method=name, **settings_for(name, words_file))
    pipe = tiny_pipeline()
    released = erasekit.erase(pipe, concept_for(name), method=name, release_unused=True, **settings_for(name, words_file))
    assert kept.delta.keys() == released.delta.keys()
    assert all(torch.equal(kept.delta[k], released.delta[k]) for k in kept.delta)
    if name in ("esd-x", "esd-u", "eap", "eap-pgd"):  # the fine-tuning loops free what they no longer need
        assert all(p.device.type == "meta" for p in pipe.text_encoder.parameters())
        with pytest.raises(ErasekitError, match="released"):
            encode(pipe, ["circle"])


def test_one_rollout_gives_the_states_of_several_shorter_rollouts(tiny) -> None:
    from erasekit.families import family_of

    family = family_of(tiny)
    schedule = family.schedule(tiny, 6)
    eps = lambda x, t, c: family.predict(tiny.unet, x, t, c)  # noqa: E731
    start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    cond, uncond = encode_cond(tiny, ["circle", "square"]), encode_cond(tiny, [""])
    states = schedule.rollout(eps, start, cond, uncond, [4, 0, 2], 3.0)
    for n, state in zip([4, 0, 2], states):
        assert torch.equal(state, schedule.rollout(eps, start, cond, uncond, [n], 3.0)[0])
    assert not torch.equal(states[0], states[2])


def test_a_shared_trajectory_gives_each_step_its_own_timestep(words_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from erasekit.families.base import Schedule

    calls: list[list[int]] = []
    real = Schedule.rollout

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(args[5]))  # (self, predict, start, cond, uncond, n_steps, guidance)
        return real(*args, **kwargs)

    monkeypatch.setattr(Schedule, "rollout", counting)
    kwargs = dict(method="eap", concept_space=str(words_file), k=8, n_centres=3, iterations=6, ddim_steps=8, lr=1e-3)
    shared = erasekit.erase(tiny_pipeline(), "circle", rollout_reuse=1, rollout_share=3, **kwargs)
    assert len(calls) == 2 and all(len(ks) == 3 for ks in calls)  # one rollout per 3 steps, 3 points along it
    assert any(len(set(ks)) > 1 for ks in calls)
    calls.clear()
    reused = erasekit.erase(tiny_pipeline(), "circle", rollout_reuse=3, **kwargs)
    assert len(calls) == 2 and all(len(ks) == 1 for ks in calls)  # the same x_t for 3 steps
    assert any(not torch.equal(shared.delta[k], reused.delta[k]) for k in shared.delta)


def test_a_lora_erasure_leaves_the_pipeline_with_its_original_modules_and_hash(words_file: Path) -> None:
    from erasekit.models import weights_hash

    pipe = tiny_pipeline()
    before_keys, before_hash = set(pipe.unet.state_dict()), weights_hash(pipe)
    result = erasekit.erase(pipe, "circle", method="esd-x", train_method="lora", **FAST)
    assert set(pipe.unet.state_dict()) == before_keys and weights_hash(pipe) == before_hash
    result.apply(pipe)  # the same pipeline object still passes the base check


@pytest.mark.parametrize("setting", [{"batch_size": 2}, {"precision": "bf16"}, {"rollout_share": 2}])
def test_age_refuses_settings_its_own_loop_does_not_use(setting: dict, words_file: Path) -> None:
    with pytest.raises(ErasekitError, match="age trains one fp32 rollout point"):
        erasekit.erase(tiny_pipeline(), "circle", method="age", **settings_for("age", words_file), **setting)


@pytest.mark.parametrize("setting, message", [
    ({"seed": -1}, "seed must be a whole number"), ({"seed": 99999999999999999999}, "seed must be a whole number"),
    ({"gumbel_lr": -1.0}, "gumbel_lr must be a positive finite"), ({"gumbel_lr": float("nan")}, "gumbel_lr must be a finite number"),
    ({"gumbel_lr": 0.0}, "gumbel_lr must be a positive finite"), ({"gumbel_temperature": float("inf")}, "gumbel_temperature must be"),
])
def test_out_of_range_search_settings_are_refused_before_training(tiny, setting: dict, message: str) -> None:
    with pytest.raises(ErasekitError, match=message) as info:
        erasekit.erase(tiny, "circle", method="eap", budget="tiny", **setting)
    assert "\n" not in str(info.value)


def test_the_python_api_uses_the_toy_preset_on_the_toy_model_as_the_cli_does() -> None:
    from erasekit.models import toy_pipeline

    result = erasekit.erase(toy_pipeline(), "circle", method="eap", iterations=1)  # the paper's K = 1000 would not fit the toy world
    assert result.config["k"] == 40 and result.config["iterations"] == 1 and result.config["ddim_steps"] == 25
