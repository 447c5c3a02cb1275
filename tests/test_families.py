"""The model-family layer: the rollout convention on both schedules, Cond algebra, detection and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from erasekit.errors import ErasekitError
from erasekit.families import Cond, detect, families, get_family
from erasekit.families.schedules import DDIMSchedule, FlowSchedule
from erasekit.world.toy import build_scheduler


def zero_data_eps(alphas: torch.Tensor):
    """The exact ε of data that is all zeros: x_t = sqrt(1 - ᾱ_t) ε, so ε = x_t / sqrt(1 - ᾱ_t)."""
    return lambda x, t, cond: x / (1 - alphas[t.long()]).sqrt().view(-1, *[1] * (x.dim() - 1))


def zero_data_velocity(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """The exact flow velocity of all-zero data: x_σ = σ ε and v = ε - x0 = x_σ / σ."""
    return x / (t / 1000).view(-1, *[1] * (x.dim() - 1))


ONE = Cond({"hidden": torch.zeros(1, 3, 2)})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_rollout_leaves_the_state_at_the_noise_level_of_the_query(prediction: str) -> None:
    config = DDIMScheduler.from_config(build_scheduler().config, prediction_type=prediction).config
    sched = DDIMSchedule(config, 50)
    alphas = sched.alphas.double()
    eps = zero_data_eps(alphas)
    if prediction == "v_prediction":  # v = sqrt(a) ε - sqrt(1 - a) x0, and x0 = 0
        eps_fn = eps
        predict = lambda x, t, c: alphas[t.long()].sqrt().view(-1, 1, 1, 1) * eps_fn(x, t, c)  # noqa: E731
    else:
        predict = eps
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = (1 - alphas[sched.grid[0]]).sqrt() * noise  # the exact state at the first grid point
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        level = sched.draw(gen)
        assert level.k * 20 <= level.t < (level.k + 1) * 20  # queried inside bin k
        x = sched.rollout(predict, start, ONE, ONE, [level.steps], 3.0)[0]
        at = float(x.norm() / noise.norm())
        assert at == pytest.approx(float((1 - alphas[int(level.grid_t)]).sqrt()), rel=1e-6)
        assert level.k * 20 <= level.grid_t < (level.k + 1) * 20  # the state's grid point is inside the queried bin
        # the x0 map of the exact output recovers the data (zeros) at the grid point's ᾱ
        x0 = sched.to_x0(x, predict(x, torch.tensor([int(level.grid_t)]), ONE), level)
        assert float(x0.abs().max()) < 1e-6


def test_flow_rollout_reaches_the_queried_sigma_exactly() -> None:
    sigmas = [1.0, 0.9, 0.7, 0.4, 0.2, 0.05, 0.0]
    sched = FlowSchedule(sigmas)
    start = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for k in range(sched.steps):
        level = sched.level(k)
        x = sched.rollout(zero_data_velocity, start, ONE, None, [level.steps], 1.0)[0]
        assert float(x.norm() / start.norm()) == pytest.approx(level.t / 1000, rel=1e-6)  # times are float32
        assert level.t == level.grid_t == sigmas[sched.steps - 1 - k] * 1000
        x0 = sched.to_x0(x, zero_data_velocity(x, torch.tensor([level.t]), ONE), level)
        assert float(x0.abs().max()) < 1e-6


def test_flow_rollout_with_cfg_guides_like_the_pipeline() -> None:
    sched = FlowSchedule([1.0, 0.5, 0.0])
    start = torch.ones(1, 2, 2)
    uncond, cond = Cond({"hidden": torch.zeros(1, 1)}), Cond({"hidden": torch.ones(1, 1)})
    predict = lambda x, t, c: x * 0 + c.parts["hidden"].view(-1, 1, 1)  # noqa: E731  (v = 0 unconditional, 1 conditional)
    x = sched.rollout(predict, start, cond, uncond, [1], 4.0)[0]
    assert torch.allclose(x, start + (0.5 - 1.0) * 4.0)


def test_cond_algebra_acts_on_every_part() -> None:
    bank = Cond({"hidden": torch.arange(12.0).view(3, 2, 2), "pooled": torch.arange(6.0).view(3, 2)})
    w = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    mixed = bank.mix(w)
    assert torch.equal(mixed.parts["hidden"][0], (bank.parts["hidden"][0] + bank.parts["hidden"][1]) / 2)
    assert torch.equal(mixed.parts["pooled"][1], bank.parts["pooled"][2])
    assert len(Cond.cat([bank, bank[1]])) == 4 and len(bank[0].expand(5)) == 5
    assert bank.flat().shape == (3, 6)


def test_detection_reads_model_index_and_refuses_in_one_line(tmp_path: Path) -> None:
    for name, family in families().items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": family.pipeline_classes[0]}))
        assert detect(folder).name == name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ErasekitError, match="KandinskyPipeline.*supported: sd .*sdxl.*sd3.*flux") as info:
        detect(tmp_path / "other")
    assert "\n" not in str(info.value)
    with pytest.raises(ErasekitError, match="--family sdxl contradicts"):
        detect(tmp_path / "sd", forced="sdxl")
    with pytest.raises(ErasekitError, match="unknown family 'kandinsky'"):
        get_family("kandinsky")
    with pytest.raises(ErasekitError, match="cannot read"):
        detect(tmp_path / "missing")


def test_train_sets_split_unet_and_joint_attention_names() -> None:
    sd, flux = get_family("sd"), get_family("flux")
    assert sd.is_xattn("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
    assert not sd.is_xattn("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight")
    assert flux.is_xattn("transformer_blocks.0.attn.add_k_proj.weight")
    assert not flux.is_xattn("transformer_blocks.0.attn.to_k.weight")
    assert not flux.is_xattn("single_transformer_blocks.0.attn.to_k.weight")
    assert flux.is_selfattn("transformer_blocks.0.attn.to_q.weight")
    assert np.isclose(FlowSchedule([1.0, 0.0]).noise_level(500.0), 0.5)


@pytest.fixture(scope="module")
def tiny() -> dict:
    from erasekit.families.tiny import FAMILIES, tiny_pipeline

    return {name: tiny_pipeline(name) for name in FAMILIES}


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_family_rollout_is_the_pipelines_own_sampler(tiny: dict, name: str) -> None:
    """Encoding, the model call, CFG and the sampler, taken apart by the family, give the pipeline's latents."""
    from erasekit.families import family_of

    pipe = tiny[name]
    family = family_of(pipe)
    assert family.name == name
    if name == "sdxl":  # the family samples with DDIM; give the pipeline the same sampler
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    steps, guidance, prompt = 4, 3.0, "a red circle"
    start = family.start_noise(pipe, torch.Generator().manual_seed(0))
    assert start.shape == family.latent_shape(pipe)
    model = family.denoiser(pipe)
    cond = family.encode(pipe, [prompt])
    uncond = family.uncond(pipe) if family.uses_cfg else None
    schedule = family.schedule(pipe, steps)
    ours = schedule.rollout(lambda x, t, c: family.predict(model, x, t, c), start, cond, uncond, [steps], guidance)[0]
    theirs = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, latents=start.clone(),
                  output_type="latent", height=32, width=32).images
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    # one level of the convention: the x0 map of the model's own output is finite and the right shape
    level = schedule.level(1)
    x = schedule.rollout(lambda x, t, c: family.predict(model, x, t, c), start, cond, uncond, [level.steps], guidance)[0]
    out = family.predict(model, x, torch.tensor([level.t]), cond)
    assert schedule.to_x0(x, out, level).shape == start.shape


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_train_sets_select_parameters_of_every_family(tiny: dict, name: str) -> None:
    from erasekit.families import family_of

    family = family_of(tiny[name])
    model = family.denoiser(tiny[name])
    total = dict(model.named_parameters())
    xattn, noxattn = family.parameters(model, "xattn"), family.parameters(model, "noxattn")
    assert xattn and noxattn and not set(xattn) & set(noxattn)
    assert set(family.parameters(model, "full")) == set(total)
    if name in ("sd3", "flux"):
        assert all("add_k_proj" in n or "add_v_proj" in n for n in xattn)
    else:
        assert all(".attn2." in n for n in xattn)
    with pytest.raises(ErasekitError, match="unknown train method"):
        family.parameters(model, "everything")


def test_training_draws_are_consistent_with_each_schedules_x0_map() -> None:
    """noised() gives (x_t, t, target) with target the model output whose x0 map is the clean sample."""
    from erasekit.families import Level

    x0 = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for schedule in (DDIMSchedule(build_scheduler().config, 10), FlowSchedule([1.0, 0.5, 0.0]),
                     DDIMSchedule(DDIMScheduler.from_config(build_scheduler().config, prediction_type="v_prediction").config, 10)):
        x_t, t, target = schedule.noised(x0, torch.Generator().manual_seed(1))
        for i in range(len(x0)):
            level = Level(k=0, steps=0, t=float(t[i]), grid_t=float(t[i]))
            back = schedule.to_x0(x_t[i : i + 1], target[i : i + 1], level)
            assert torch.allclose(back, x0[i : i + 1], atol=1e-5), type(schedule).__name__


@pytest.mark.parametrize("flow", [False, True])
def test_rollout_queries_the_model_with_its_time_on_the_state_device(flow: bool) -> None:
    # the meta device stands in for a GPU on a CPU-only machine: a time left on the CPU failed every
    # fine-tuning method on CUDA (found running ESD-x on an H200)
    seen: list[tuple[torch.device, torch.device]] = []

    def predict(x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        seen.append((x.device, t.device))
        return x

    if flow:
        sched: DDIMSchedule | FlowSchedule = FlowSchedule([1.0, 0.5, 0.0])
    else:
        sched = DDIMSchedule(build_scheduler().config, 4)
    start = torch.zeros(1, 4, 2, 2, device="meta")
    meta = Cond({"hidden": torch.zeros(1, 3, 2, device="meta")})
    sched.rollout(predict, start, meta, meta, [2], 3.0)
    sched.rollout(predict, start, meta, None, [2], 1.0)
    assert seen and all(x == t == torch.device("meta") for x, t in seen)
