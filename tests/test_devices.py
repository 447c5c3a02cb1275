"""Every method runs where the pipeline lives: tensors a method makes itself follow the model's device.

CI has no GPU, so the CPU-side checks use the meta device as the "other" device (a tensor left on the
CPU then fails as it would on CUDA); ``test_every_method_erases_and_generates_on_cuda`` runs every
diffusion method on the toy world on a GPU where one is present (found broken there for six methods:
a time step, Gumbel weights, a discriminator, an SAE hook, MACE's fusion and RealEra's draws stayed on the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from erasekit.families import Cond
from erasekit.methods.doco import Discriminator, DoCoConfig
from erasekit.methods.itd import build_itd_hook
from erasekit.methods.mace_parts import fuse
from erasekit.methods.sae import TopKSAE, sae_tensors

META = torch.device("meta")


def test_a_mix_of_cpu_weights_over_a_bank_elsewhere_lands_with_the_bank() -> None:
    # EAP's Gumbel logits live on the CPU; the bank of candidate embeddings lives with the model
    bank = Cond({"hidden": torch.zeros(3, 2, 4, device=META), "pooled": torch.zeros(3, 4, device=META)})
    mixed = bank.mix(torch.tensor([[0.2, 0.3, 0.5]]))
    assert all(v.device == META and v.shape[0] == 1 for v in mixed.parts.values())


def test_the_doco_discriminator_is_built_on_the_model_device_with_the_same_initial_weights() -> None:
    config = DoCoConfig()
    here = Discriminator((4, 8, 8), config, "h", torch.Generator().manual_seed(3))
    there = Discriminator((4, 8, 8), config, "h", torch.Generator().manual_seed(3), META)
    assert all(p.device == META for p in there.net.parameters())
    assert [p.shape for p in here.net.parameters()] == [p.shape for p in there.net.parameters()]
    assert Discriminator((4, 8, 8), config, "h", torch.Generator().manual_seed(3)).net.state_dict().keys() == here.net.state_dict().keys()
    again = Discriminator((4, 8, 8), config, "h", torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(here.net.parameters(), again.net.parameters()))


def test_the_itd_hook_follows_the_encoder_to_its_device() -> None:
    sae = TopKSAE(4, 6, 2)
    tensors = {**sae_tensors(sae), "features": torch.tensor([0, 3])}
    hook = build_itd_hook(tensors, {"k": 2, "scale": 0.0, "threshold": 0.5, "selective": True}, 4)
    out = hook(torch.zeros(2, 3, 4, device=META))
    assert out.device == META and out.shape == (2, 3, 4)


def test_mace_fusion_solves_on_the_cpu_in_float64_whatever_the_weights_dtype() -> None:
    # a closed form computed on the CPU in float64 gives the same edit on any device; weights of another dtype
    # (as a float32 or a GPU model gives them) are brought there first
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g, dtype=torch.float32)
    target = {"m": torch.randn(3, 5, generator=g, dtype=torch.float32)}
    keys, keep = [torch.randn(4, 5, generator=g, dtype=torch.float64)], torch.randn(6, 5, generator=g, dtype=torch.float64)
    out = fuse({"m": w}, [target], keys, keep.float(), 1.0)["m"]
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    # the answer in closed form: W* (G + G_p + r I) = W_1 G + W G_p + r W
    gram, g_keep = keys[0].T @ keys[0], keep.T @ keep
    lhs = gram + g_keep + 1e-4 * torch.eye(5, dtype=torch.float64)
    rhs = target["m"].double() @ gram + w.double() @ g_keep + 1e-4 * w.double()
    assert torch.allclose(out @ lhs, rhs, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run it where one is)")
def test_every_method_erases_and_generates_on_cuda() -> None:
    from erasekit.api import erase
    from erasekit.hooks import remove
    from erasekit.methods.specs import registry
    from erasekit.models import load_pipeline
    from erasekit.world.check import generate

    pipe = load_pipeline("toy", device="cuda")
    pipe.set_progress_bar_config(disable=True)
    failed = []
    for name, spec in sorted(registry().items()):
        if "sd" not in spec.families:
            continue
        unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        text = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
        try:
            result = erase(pipe, "skull" if name == "geom-erasing" else "circle", method=name, budget="tiny")
            images = generate(result.apply(pipe), ["an image of a circle"], [0], 3, 7.5)
            assert images.shape == (1, 32, 32, 3)
        except Exception as exc:  # every method is tried; the failures are listed together
            failed.append(f"{name}: {type(exc).__name__}: {str(exc)[:160]}")
        finally:
            remove(pipe)
            pipe.unet.load_state_dict(unet)
            pipe.text_encoder.load_state_dict(text)
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run it where one is)")
def test_the_toy_world_trains_on_cuda(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from conftest import tiny_config
    from erasekit.world.train import WorldTrainer

    out = tmp_path / "run"
    WorldTrainer(out, tiny_config(), device="cuda").run()
    meta = json.loads((out / "world_train.json").read_text())
    assert meta["devices"] == dict.fromkeys(("data", "vae", "clip", "judge", "unet"), "cuda")
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", dtype=torch.float32).to("cuda")
    image = pipe("a red circle", num_inference_steps=4, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
