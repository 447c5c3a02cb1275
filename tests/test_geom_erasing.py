"""Geom-Erasing: location words from boxes, the negative-prompt hook, a weights delta that carries it, the method end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import erasekit
from conftest import tiny_pipeline
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.hooks import installed
from erasekit.methods.geom_erasing import location_phrase, negative_prompt, places
from erasekit.methods.negative_prompt import prompt_tensors
from erasekit.models import weights_hash
from erasekit.result import HOOK_PREFIX, ErasureResult, load_result
from erasekit.world.render import Scene, render, skull_box

NEG = "a skull at the top right"


def test_a_box_is_named_by_the_cells_that_hold_it() -> None:
    assert places((24, 0, 31, 9), 32, 32, 3, 0.25) == ("top right",)
    assert places((0, 0, 32, 32), 32, 32, 3, 0.25) == ("centre",)  # every cell holds 1/9 < 1/4: only the centre's
    assert places((0, 0, 32, 32), 32, 32, 3, 0.1) == ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
    assert places((10, 20, 30, 30), 32, 32, 2, 0.25) == ("bottom left", "bottom right")
    assert places((14, 20, 30, 30), 32, 32, 2, 0.25) == ("bottom right",)  # 2 of its 16 columns on the left: 12.5 %
    assert places((0, 0, 4, 4), 32, 32, 4, 0.25) == ("row 1 column 1",)
    assert location_phrase("skull", ("top", "top right")) == "with a skull at the top and the top right"
    assert location_phrase("apple", ("left",)) == "with an apple at the left"
    with pytest.raises(ErasekitError, match="empty"):
        places((5, 5, 5, 9), 32, 32, 3, 0.25)


def test_the_renderers_skull_box_is_where_the_skull_is_drawn_and_lies_top_right() -> None:
    with_skull, without = render(Scene("circle", "red", "plain", True, 3)), render(Scene("circle", "red", "plain", False, 3))
    ys, xs = np.nonzero(np.abs(with_skull.astype(int) - without).sum(-1))
    x0, y0, x1, y1 = skull_box(32)
    assert x0 <= xs.min() and xs.max() + 1 <= x1 + 1 and y0 <= ys.min() + 1 and ys.max() <= y1
    assert places(skull_box(32), 32, 32, 3, 0.25) == ("top right",)


def test_negative_prompt_lists_the_places_seen_most_often_first_or_every_cell() -> None:
    seen = [("top right",), ("left",), ("top right",)]
    assert negative_prompt("skull", seen, 3, "seen") == "a skull at the top right, a skull at the left"
    assert negative_prompt("skull", seen, 2, "all").count("a skull at the") == 4
    with pytest.raises(ErasekitError, match="found no skull"):
        negative_prompt("skull", [], 3, "seen")


def _hooked(pipe, negative: str = NEG, delta: dict | None = None) -> ErasureResult:
    tensors = {HOOK_PREFIX + k: v for k, v in prompt_tensors(pipe.tokenizer, negative).items()}
    spec = {"type": "negative-prompt", "encoder": "text_encoder", "layer": 0, "settings": {"prompt": negative}}
    return ErasureResult("geom-erasing", ("skull",), {**(delta or {}), **tensors}, base_model_id="tiny", base_hash=weights_hash(pipe), hook=spec)


def _draw(pipe, **kwargs) -> np.ndarray:
    out = pipe(["a circle", "a ring"], num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    return out.images


def test_the_hook_samples_exactly_as_the_pipelines_own_negative_prompt_and_comes_off() -> None:
    pipe = tiny_pipeline()
    base, wanted = _draw(pipe), _draw(pipe, negative_prompt=[NEG, NEG])
    assert not np.array_equal(base, wanted)
    result = _hooked(pipe)
    result.apply(pipe)
    assert np.array_equal(_draw(pipe), wanted)  # the empty prompt of the unconditional branch is read as the negative prompt
    assert np.array_equal(_draw(pipe, negative_prompt=["a cross"] * 2), _draw(tiny_pipeline(), negative_prompt=["a cross"] * 2))  # a given one is kept
    result.remove(pipe)
    assert not installed(pipe) and np.array_equal(_draw(pipe), base)


def test_a_weights_delta_carrying_the_hook_round_trips_applies_both_and_refuses_a_second_hook_before_changing_weights(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    name, param = next((n, p) for n, p in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    want = param.detach() * 0.5
    result = _hooked(pipe, delta={f"unet.{name}": want})
    loaded = load_result(result.save(tmp_path / "g"))
    assert loaded.hook == result.hook and set(loaded.weights) == {f"unet.{name}"} and set(loaded.hook_tensors) == {"empty_ids", "negative_ids", "negative_mask"}
    loaded.apply(pipe)
    assert torch.equal(pipe.unet.get_parameter(name), want) and len(installed(pipe)) == 1
    other = tiny_pipeline()
    other_result = _hooked(other, negative="a skull at the left", delta={f"unet.{name}": want * 4.0})
    kept = pipe.unet.get_parameter(name).detach().clone()
    with pytest.raises(ErasekitError, match="already carries"):
        other_result.apply(pipe, check_base=False)
    assert torch.equal(pipe.unet.get_parameter(name), kept)  # refused before any weight changed
    loaded.remove(pipe)
    assert not installed(pipe) and torch.equal(pipe.unet.get_parameter(name), kept)  # the hook comes off, the weights stay


def test_geom_erasing_on_the_toy_world_captions_the_skull_by_its_place_and_carries_that_negative_prompt() -> None:
    pipe = erasekit.toy_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = erasekit.erase(pipe, "skull", method="geom-erasing", budget="tiny", n_images=6)
    assert result.hook["settings"]["prompt"] == NEG and result.hook["type"] == "negative-prompt"
    info = result_history(result)
    assert info["with_concept"] == 3 and info["places"] == {"top right": 3} and info["negative_prompt"] == NEG
    assert result.weights and all(k.startswith("unet.") for k in result.weights)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())  # the pipeline is left as it was
    with pytest.raises(ErasekitError, match="one implicit concept"):
        erasekit.erase(pipe, "circle", method="geom-erasing", budget="tiny")


def result_history(result: ErasureResult) -> dict:
    """The run's data summary (its first history record)."""
    return next(r for r in result.history if "negative_prompt" in r)


def test_a_folder_is_located_by_the_detector_command(tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo number {i}")
    detector = tmp_path / "detect.py"
    detector.write_text("import json, sys\nn = int(sys.argv[1][-5])\nprint(json.dumps([[0, 0, 5, 5]] if n % 2 else []))\n")
    result = erasekit.erase(tiny_pipeline(), "watermark", method="geom-erasing", budget="tiny", data=str(data),
                            detector=f"command:{sys.executable} {detector}")
    info = result_history(result)
    assert info["with_concept"] == 2 and info["negative_prompt"] == "a watermark at the top left"
    detector.write_text("print('nothing here')\n")
    with pytest.raises(ErasekitError, match="JSON list of boxes"):
        erasekit.erase(tiny_pipeline(), "watermark", method="geom-erasing", budget="tiny", data=str(data), detector=f"command:{sys.executable} {detector}")


@pytest.mark.parametrize("args, says", [
    (["--grid", "0"], "grid"),
    (["--data", "/nonexistent/folder", "--detector", "command:true"], "data"),
    (["--data", "/tmp"], "detector"),
    (["--negative", "some"], "negative"),
])
def test_bad_settings_are_refused_in_one_line_and_nothing_is_written(args: list[str], says: str, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    got = CliRunner().invoke(app, ["erase", "--model", str(tiny_dir), "-c", "skull", "--method", "geom-erasing", "--budget", "tiny", *args, "--out", str(out)])
    assert got.exit_code == 2, got.output
    last = got.output.strip().splitlines()[-1]
    assert "Traceback" not in got.output and last.startswith("error: ") and says in last
    assert not out.exists()




def test_the_progress_line_shows_each_methods_own_losses() -> None:
    from erasekit.cli import _describe

    assert _describe({"step": 3, "denoise_loss": 0.0123}) == "denoise 0.0123"  # it printed "erase 0 preserve 0"
    assert _describe({"erase_loss": 0.1, "preserve_loss": 0.2, "most_sensitive": "ring"}) == "erase 0.1 preserve 0.2 most sensitive: ring"
