"""Loading pipelines, saving and loading deltas (weights and LoRA), and refusing bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import erasekit
from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.models import load_pipeline, select_parameters, weights_hash
from erasekit.result import load_result
from erasekit.sampling import generate

SETTINGS = {"iterations": 3, "ddim_steps": 3, "lr": 1e-2}


def test_save_load_round_trip_gives_identical_images(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    result = erasekit.erase(pipe, "circle", method="esd-x", **SETTINGS)
    path = result.save(tmp_path / "delta.safetensors")
    result.apply(pipe)
    expected = generate(pipe, ["a circle", "a star"], [3, 4], steps=3)
    fresh = erasekit.load(tiny_pipeline(), path)
    assert np.array_equal(generate(fresh, ["a circle", "a star"], [3, 4], steps=3), expected)
    loaded = load_result(path)
    assert loaded.method == "esd-x" and loaded.concepts == ("circle",) and loaded.config["iterations"] == 3
    assert loaded.base_hash == weights_hash(tiny_pipeline())


def test_delta_holds_only_what_changed(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    result = erasekit.erase(pipe, "circle", method="esd-x", **SETTINGS)
    assert set(result.delta) == {f"unet.{n}" for n in select_parameters(pipe.unet, "xattn")}


def test_lora_result_loads_with_diffusers_load_lora_weights(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    result = erasekit.erase(pipe, "circle", method="esd-x", train_method="lora", lora_rank=2, **SETTINGS)
    assert result.kind == "lora"
    path = result.save(tmp_path / "delta.safetensors")
    ours = erasekit.load(tiny_pipeline(), path)
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(path))
    base = generate(tiny_pipeline(), ["a circle"], [0], steps=3)
    a = generate(ours, ["a circle"], [0], steps=3)
    b = generate(theirs, ["a circle"], [0], steps=3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    from erasekit.concepts import encode

    emb = encode(ours, ["a circle"])
    with torch.no_grad():
        e_ours = ours.unet(x, torch.tensor([500]), encoder_hidden_states=emb).sample
        e_base = tiny_pipeline().unet(x, torch.tensor([500]), encoder_hidden_states=emb).sample
    assert not torch.allclose(e_ours, e_base), "the LoRA must change the model"
    assert base.shape == a.shape


def test_delta_refuses_a_different_base(tmp_path: Path) -> None:
    result = erasekit.erase(tiny_pipeline(), "circle", method="esd-x", **SETTINGS)
    path = result.save(tmp_path / "delta.safetensors")
    with pytest.raises(ErasekitError, match="made for base"):
        erasekit.load(tiny_pipeline(seed=1), path)
    erasekit.load(tiny_pipeline(seed=1), path, check_base=False)


def test_save_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path: Path) -> None:
    result = erasekit.erase(tiny_pipeline(), "circle", method="esd-x", **SETTINGS)
    path = result.save(tmp_path / "delta.safetensors")
    with pytest.raises(ErasekitError, match="already exists"):
        result.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not-erasekit"])
def test_damaged_delta_files_give_clear_errors(tmp_path: Path, damage: str) -> None:
    result = erasekit.erase(tiny_pipeline(), "circle", method="esd-x", **SETTINGS)
    path = result.save(tmp_path / "delta.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ErasekitError) as info:
        load_result(path)
    assert "\n" not in str(info.value)


def test_load_pipeline_from_folder_and_bad_folders(tiny_dir: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(str(tiny_dir))
    assert weights_hash(pipe) == weights_hash(tiny_pipeline())
    (tmp_path / "empty").mkdir()
    for bad, message in [(str(tmp_path / "empty"), "model_index.json"), (str(tmp_path / "missing"), "no pipeline folder"), ("", "empty")]:
        with pytest.raises(ErasekitError, match=message):
            load_pipeline(bad)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ErasekitError, match="cannot (load|read)"):
        load_pipeline(str(broken))
