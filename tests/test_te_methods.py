"""Text-encoder training methods: AdvUnlearn and few-shot unlearning, on cases whose answer is known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import erasekit
from conftest import tiny_pipeline
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.families import Cond
from erasekit.methods import get_method, make_config
from erasekit.methods.advunlearn import Prefixes, attack_prefix
from erasekit.methods.base import ErasureRequest
from erasekit.methods.te_model import te_parameters


def _text_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.text_encoder.named_parameters()}


def test_layer_sets_name_exactly_their_parameters() -> None:
    encoder = tiny_pipeline().text_encoder
    last = te_parameters(encoder, "last")
    layers = sorted({n.split("layers.")[1].split(".")[0] for n in te_parameters(encoder, "all") if "layers." in n})
    assert last and all(f"layers.{layers[-1]}." in n and (".self_attn." in n or ".mlp." in n) for n in last)
    assert all(".self_attn." in n for n in te_parameters(encoder, "attn"))
    assert all(".mlp." in n for n in te_parameters(encoder, "mlp"))
    assert not any("embedding" in n for n in te_parameters(encoder, "all"))  # the attack's vocabulary stays the base's
    with pytest.raises(ErasekitError, match="choose one of"):
        te_parameters(encoder, "everything")


def test_advunlearn_retain_loss_starts_at_zero_and_the_attack_starts_after_the_warmup() -> None:
    pipe = tiny_pipeline()
    result = erasekit.erase(pipe, "circle", method="advunlearn", budget="tiny", iterations=4, warmup=2, retain_prompts="toy")
    steps = [h for h in result.history if "step" in h]
    # before the first update the trained encoder is the base one: the retain term compares a prediction with itself
    assert steps[0]["retain_loss"] == 0.0 and steps[-1]["retain_loss"] > 0.0
    assert [h["attacked"] for h in steps] == [False, False, True, True]


def test_the_inner_attack_moves_the_prefix_toward_regenerating_the_concept() -> None:
    pipe = tiny_pipeline()
    config = make_config(get_method("advunlearn"), "tiny", attack_steps=10, attack_lr=1e-2)
    from erasekit.methods.te_model import prepare_te

    s = prepare_te(pipe, ErasureRequest(("circle",)), config, config.te_layers)
    try:
        tr = s.trainable
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([400.0])
        goal = tr.frozen_eps(x, t, s.emb_targets[0]).float()
        table = tr.encoder.get_input_embeddings().weight.detach()
        start = table[[320]].float()[None].clone()  # the prefix starts at a fixed token
        prefixes = Prefixes(1)
        prefixes.embs[0] = start.clone()

        def attack_loss(delta: torch.Tensor) -> float:
            with torch.no_grad():
                return float(torch.nn.functional.mse_loss(tr.eps(x, t, tr.encode_slots(["a circle"], delta)).float(), goal))

        found = attack_prefix(s, tr, prefixes, 0, "a circle", x, t, goal)
        assert found.shape == start.shape and attack_loss(found) < attack_loss(start)
        assert torch.equal(prefixes.embs[0], found)  # "latest": the next attack starts here
    finally:
        s.trainable.restore()


def _denoise_loss(pipe, latents: torch.Tensor, prompt: str) -> float:
    """The denoising loss on fixed draws: what few-shot unlearning ascends."""
    from erasekit.families import family_of

    fam = family_of(pipe)
    sched = fam.schedule(pipe, 10)
    g = torch.Generator().manual_seed(5)
    x_t, t, target = sched.noised(latents.repeat(8, 1, 1, 1), g)
    with torch.no_grad():
        cond: Cond = fam.encode(pipe, [prompt] * len(x_t))
        return float(torch.nn.functional.mse_loss(fam.predict(pipe.unet, x_t, t, cond), target))


def _write_images(folder: Path, n: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_fewshot_ascends_the_denoising_loss_of_its_images_and_trains_only_the_last_layer(tmp_path: Path) -> None:
    folder = _write_images(tmp_path / "imgs", 4)
    pipe = tiny_pipeline()
    from erasekit.methods.fewshot_te import folder_latents, image_files

    latents = folder_latents(pipe, image_files(str(folder)))
    before = _denoise_loss(pipe, latents, "a photo of a circle")
    result = erasekit.erase(pipe, "circle", method="fewshot-te", images=str(folder), epochs=3, lr=1e-2)
    assert result.config["iterations"] == 6  # 3 epochs of ceil(4 / 2) steps
    assert {k.removeprefix("text_encoder.") for k in result.delta} == set(te_parameters(pipe.text_encoder, "last"))
    after = _denoise_loss(result.apply(tiny_pipeline()), latents, "a photo of a circle")
    assert after > before


@pytest.mark.parametrize("case, match", [
    ("missing", "is not a folder"), ("empty", "holds no image"), ("unreadable", "cannot be read as an image"), ("too few", "larger than the 1 image"),
])
def test_fewshot_bad_image_folders_are_refused_in_one_line_before_anything_changes(case: str, match: str, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    if case == "empty":
        folder.mkdir()
    elif case == "unreadable":
        _write_images(folder, 3)
        (folder / "broken.png").write_bytes(b"not a png")
    elif case == "too few":
        _write_images(folder, 1)
    pipe = tiny_pipeline()
    before = _text_state(pipe)
    with pytest.raises(ErasekitError, match=match) as info:
        erasekit.erase(pipe, "circle", method="fewshot-te", images=str(folder))
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in pipe.text_encoder.named_parameters())


def test_an_empty_retain_file_is_refused_by_the_cli_with_exit_2_and_nothing_written(tiny_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "retain.txt"
    empty.write_text("\n\n", encoding="utf-8")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["erase", "--model", str(tiny_dir), "--concept", "circle", "--method", "advunlearn", "--budget", "tiny",
                                      "--retain-prompts", str(empty), "--out", str(out)])
    assert result.exit_code == 2 and "holds no prompt" in result.output and "Traceback" not in result.output
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_a_text_encoder_delta_runs_through_generate_and_evaluate_from_the_cli(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner = CliRunner()
    erased = runner.invoke(app, ["erase", "--model", str(tiny_dir), "--concept", "circle", "--method", "fewshot-te", "--budget", "tiny", "--out", str(out)])
    assert erased.exit_code == 0, erased.output
    grid = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "a circle", "--delta", str(out), "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert grid.exit_code == 0, grid.output
    other = tiny_pipeline(seed=1)
    with pytest.raises(ErasekitError, match="base"):
        erasekit.load(other, out / "delta.safetensors")  # the base check covers the text encoder the delta changes
