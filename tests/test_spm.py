"""SPM: the gate and the membranes on cases with a known answer, the method end to end on a tiny model, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import erasekit
from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.hooks import installed
from erasekit.methods.spm import membranes, with_transport
from erasekit.methods.spm_adapter import build_spm_hook, gate
from erasekit.models import weights_hash
from erasekit.result import load_result

ON = {"transport": True, "low": 0.2, "high": 0.6, "strength": 1.0}


def test_the_gate_rises_linearly_from_low_to_high_and_is_flat_with_transport_off() -> None:
    keys = torch.tensor([[1.0, 0.0, 0.0]])
    bos = [9.0, 9.0, 9.0]  # the start token is never compared
    states = torch.tensor([[bos, [1.0, 0.0, 0.0]],           # cosine 1 -> full
                           [bos, [0.0, 1.0, 0.0]],           # cosine 0 -> off
                           [bos, [0.4, (1 - 0.16) ** 0.5, 0.0]]])  # cosine 0.4 -> half way from 0.2 to 0.6
    assert torch.allclose(gate(states, keys, ON), torch.tensor([1.0, 0.0, 0.5]), atol=1e-6)
    assert torch.equal(gate(states, keys, {**ON, "transport": False, "strength": 0.7}), torch.full((3,), 0.7))


class TwoLayers(nn.Module):
    """A UNet stand-in called as diffusers calls it: (sample, timestep, encoder_hidden_states)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.proj = nn.Linear(3, 2)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(sample).mean((2, 3)))


def test_each_prompt_gets_its_own_strength_of_the_membrane_and_a_gated_off_prompt_passes_bit_for_bit() -> None:
    torch.manual_seed(0)
    net = TwoLayers()
    down, up = torch.randn(1, 3), torch.randn(2, 1)
    cdown, cup = torch.randn(1, 2, 3, 3), torch.randn(3, 1, 1, 1)
    tensors = {"gate.keys": torch.tensor([[1.0, 0.0]]), "proj.down": down, "proj.up": up, "conv.down": cdown, "conv.up": cup}
    x, t = torch.randn(2, 2, 4, 4), torch.zeros(2)
    ehs = torch.tensor([[[5.0, 5.0], [1.0, 0.0]], [[5.0, 5.0], [0.0, 1.0]]])  # row 0: the concept (gate 1); row 1: far (gate 0)
    base = net(x, t, encoder_hidden_states=ehs)
    handles = build_spm_hook(tensors, ON, net)()
    try:
        out = net(x, t, encoder_hidden_states=ehs)
    finally:
        for h in handles:
            h.remove()
    h = net.conv(x[:1]) + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x[:1], cdown, padding=1), cup)
    pooled = h.mean((2, 3))
    expected = net.proj(pooled) + pooled @ down.t() @ up.t()
    assert torch.allclose(out[0], expected[0], atol=1e-5)
    assert torch.equal(out[1], base[1]), "a prompt the gate shuts must pass through unchanged"
    assert torch.equal(net(x, t, encoder_hidden_states=ehs), base), "the handles take every hook off"


def test_the_hook_refuses_an_adapter_made_for_another_model() -> None:
    net = TwoLayers()
    good = {"gate.keys": torch.ones(1, 2), "proj.down": torch.ones(1, 3), "proj.up": torch.ones(2, 1)}
    with pytest.raises(ErasekitError, match="another model"):
        build_spm_hook({**good, "proj.down": torch.ones(1, 5)}, ON, net)
    with pytest.raises(ErasekitError, match="another model"):
        build_spm_hook({**good, "nowhere.down": torch.ones(1, 3), "nowhere.up": torch.ones(2, 1)}, ON, net)
    with pytest.raises(ErasekitError, match="low < high"):
        build_spm_hook(good, {**ON, "low": 0.7}, net)


def test_membranes_read_both_lora_key_formats() -> None:
    a, b = torch.ones(1, 4), torch.ones(4, 1)
    assert set(membranes({"unet.x.to_q.lora.down.weight": a, "unet.x.to_q.lora.up.weight": b})) == {"x.to_q.down", "x.to_q.up"}
    assert set(membranes({"unet.conv_in.lora_A.weight": a, "unet.conv_in.lora_B.weight": b})) == {"conv_in.down", "conv_in.up"}


def _images(pipe, prompts: list[str]) -> np.ndarray:
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=2, guidance_scale=3.0, generator=gens, output_type="np", height=32, width=32).images


def test_spm_erases_through_a_gated_hook_that_leaves_far_prompts_and_the_weights_alone(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    base_hash = weights_hash(pipe)
    result = erasekit.erase(pipe, "circle", method="spm", budget="tiny", lr=5e-2)
    assert result.kind == "hook" and result.hook["type"] == "spm" and result.hook["encoder"] == "unet"
    settings = result.hook["settings"]
    assert settings["transport"] and 0 <= settings["low"] < settings["high"] <= 1
    path = tmp_path / "spm.safetensors"
    result.save(path)
    loaded = load_result(path)
    prompts = ["a circle", ""]
    before = _images(pipe, prompts)
    loaded.apply(pipe)
    assert weights_hash(pipe) == base_hash and len(installed(pipe)) == 1
    after = _images(pipe, prompts)
    assert not np.array_equal(after[0], before[0]), "the concept's prompt goes through the adapter"
    assert np.array_equal(after[1], before[1]), "the empty prompt is an anchor: the gate shuts, the image is the base's"
    erasekit.remove(pipe)
    assert np.array_equal(_images(pipe, prompts), before)
    with_transport(loaded, False).apply(pipe)
    assert not np.array_equal(_images(pipe, prompts)[1], before[1]), "transport off: every prompt gets the full adapter"


def test_spm_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    with pytest.raises(ErasekitError, match="latent anchoring"):
        erasekit.erase(pipe, "circle", method="spm", budget="tiny", preserve=["square"])
    with pytest.raises(ErasekitError, match="lora"):
        erasekit.erase(pipe, "circle", method="spm", budget="tiny", train_method="xattn")
    with pytest.raises(ErasekitError, match="cannot be read"):
        erasekit.erase(pipe, "circle", method="spm", budget="tiny", anchors=str(tmp_path / "missing.txt"))
    with pytest.raises(ErasekitError, match="not an spm one"):
        with_transport(erasekit.erase(pipe, "circle", method="esd-x", budget="tiny"), False)


def test_generate_shows_an_spm_adapter_with_transport_on_and_off(tiny_dir: Path, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.grid import prompt_grid

    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["erase", "--model", str(tiny_dir), "-c", "circle", "--method", "spm", "--budget", "tiny", "--out", str(run)])
    assert res.exit_code == 0, res.output
    grid = tmp_path / "grid.png"
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "-p", "a circle", "--delta", str(run), "--out", str(grid),
                              "--images", "1", "--steps", "2"])
    assert res.exit_code == 0, res.output
    blank = np.zeros((1, 32, 32, 3), np.uint8)
    three = prompt_grid(["a circle"], 1, [("a", blank), ("b", blank), ("c", blank)]).size
    assert Image.open(grid).size == three, "base | transport on | transport off"


def test_the_hook_reproduces_the_trained_peft_adapter_exactly() -> None:
    from erasekit.methods.spm import adapter_targets
    from erasekit.models import add_lora, lora_state_dict, remove_lora

    pipe = tiny_pipeline()
    unet = pipe.unet
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    base = unet(x, t, encoder_hidden_states=ehs).sample
    params = add_lora(unet, 1, adapter_targets(unet))
    with torch.no_grad():
        for p in params.values():
            p.normal_(0, 0.2)  # lora_B starts at zero: give both halves values
    adapted = unet(x, t, encoder_hidden_states=ehs).sample
    tensors = {"gate.keys": torch.randn(3, 16), **membranes(lora_state_dict(unet))}
    remove_lora(unet)
    assert torch.equal(unet(x, t, encoder_hidden_states=ehs).sample, base)
    handles = build_spm_hook(tensors, {**ON, "transport": False}, unet)()
    hooked = unet(x, t, encoder_hidden_states=ehs).sample
    for h in handles:
        h.remove()
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert torch.allclose(hooked, adapted, atol=1e-5), float((hooked - adapted).abs().max())


def test_two_adapters_on_one_model_each_follow_their_own_gate_and_add_up() -> None:
    from types import SimpleNamespace

    from erasekit.hooks import install, take_off

    torch.manual_seed(1)
    net = TwoLayers()
    pipe = SimpleNamespace(unet=net)
    first = {"gate.keys": torch.tensor([[1.0, 0.0]]), "proj.down": torch.randn(1, 3), "proj.up": torch.randn(2, 1)}
    second = {"gate.keys": torch.tensor([[0.0, 1.0]]), "proj.down": torch.randn(1, 3), "proj.up": torch.randn(2, 1)}
    x, t = torch.randn(3, 2, 4, 4), torch.zeros(3)
    ehs = torch.tensor([[[5.0, 5.0], [1.0, 0.0]],   # the first concept: only the first adapter opens
                        [[5.0, 5.0], [0.0, 1.0]],   # the second concept: only the second
                        [[5.0, 5.0], [-1.0, -1.0]]])  # neither
    pooled = net.conv(x).mean((2, 3))
    base = net.proj(pooled)
    spec = {"type": "spm", "encoder": "unet", "layer": 0, "settings": ON}
    install(pipe, first, spec)
    install(pipe, second, spec)
    assert len(installed(pipe)) == 2
    with pytest.raises(ErasekitError, match="already on the pipeline"):
        install(pipe, second, spec)
    out = net(x, t, encoder_hidden_states=ehs)
    one = pooled @ first["proj.down"].t() @ first["proj.up"].t()
    two = pooled @ second["proj.down"].t() @ second["proj.up"].t()
    assert torch.allclose(out, torch.stack([base[0] + one[0], base[1] + two[1], base[2]]), atol=1e-5)
    assert torch.equal(out[2], base[2]), "a prompt near neither concept passes through both adapters unchanged"
    off = {**ON, "transport": False}
    take_off(pipe)
    install(pipe, first, {**spec, "settings": off})
    install(pipe, second, {**spec, "settings": off})
    assert torch.allclose(net(x, t, encoder_hidden_states=ehs), base + one + two, atol=1e-5), "transport off: the adapters add up"
    assert take_off(pipe) == 2 and not installed(pipe)
    assert torch.equal(net(x, t, encoder_hidden_states=ehs), base)


def test_an_spm_adapter_does_not_stack_on_another_kind_of_hook(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    spm = erasekit.erase(pipe, "circle", method="spm", budget="tiny")
    erasekit.erase(pipe, "square", method="itd", budget="tiny").apply(pipe)
    with pytest.raises(ErasekitError, match="already carries an erasekit hook"):
        spm.apply(pipe)
    assert len(installed(pipe)) == 1


def test_generate_combines_two_spm_adapters_and_refuses_other_methods_in_the_mix(tiny_dir: Path, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.grid import prompt_grid

    runner = CliRunner()
    runs = {}
    for concept, method in (("circle", "spm"), ("square", "spm"), ("star", "esd-x")):
        runs[concept] = tmp_path / concept
        res = runner.invoke(app, ["erase", "--model", str(tiny_dir), "-c", concept, "--method", method, "--budget", "tiny", "--out", str(runs[concept])])
        assert res.exit_code == 0, res.output
    grid = tmp_path / "grid.png"
    common = ["generate", "--model", str(tiny_dir), "-p", "a circle", "-p", "a square", "--images", "1", "--steps", "2"]
    res = runner.invoke(app, [*common, "--delta", str(runs["circle"]), "--delta", str(runs["star"]), "--out", str(grid)])
    assert res.exit_code == 2 and "only when all are SPM adapters" in res.output and not grid.exists()
    res = runner.invoke(app, [*common, "--delta", str(runs["circle"]), "--delta", str(runs["square"]), "--out", str(grid)])
    assert res.exit_code == 0, res.output
    blank = np.zeros((2, 32, 32, 3), np.uint8)
    assert Image.open(grid).size == prompt_grid(["a circle", "a square"], 1, [("a", blank)] * 3).size
